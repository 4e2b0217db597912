//! Legacy PC devices on the port I/O bus.
