"""Stateful actors: Station, Rental and Wallet, and the runtime that serializes their commands."""
