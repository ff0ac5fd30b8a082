//! Test crate: the tests live in tests/tests/*.rs
