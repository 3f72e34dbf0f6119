//! Real servers for Outpost's tests, started by the tests themselves: [`postgres`], a PostgreSQL
//! server of a test's own, and [`s3`], an S3-compatible object store (Garage) of a test's own;
//! and [`ports`], the ports that servers like these, started on an address chosen beforehand,
//! are given. A crate of its own, with no Outpost crate under it, so that the hub's unit tests
//! and the end-to-end suites (which depend on the hub) both stand on it.

pub mod ports;
pub mod postgres;
pub mod s3;
