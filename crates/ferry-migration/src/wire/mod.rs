//! The migration stream's byte formats.
