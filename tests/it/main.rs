//! The one integration-test binary: every test runs the real proxy in-process against the
//! in-process mock upstream on loopback. No fixed ports, no internet, no sleeps standing in
//! for synchronisation.

mod support;

mod budget;
mod chutes;
mod clients;
mod core;
mod dashboard;
mod fleet;
mod hostile;
mod observability;
mod operator;
mod shards;
mod signals;
mod smoke;
mod speak;
