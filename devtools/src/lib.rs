//! Development-only tools for prereg. This crate is a dev-dependency of
//! `prereg` (tests and benches); the production binary never links it.

pub mod smtp_sink;
