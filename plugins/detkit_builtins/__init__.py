"""The components that ship with detkit, registered through entry points like any plugin."""
