//! End-to-end tests: one test binary (linked once), real clusters and real FUSE mounts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth_guard;
mod bad_input;
mod basic;
mod directory_outage;
mod faults;
mod feed;
mod groups;
mod large;
mod local_ids;
mod locks_etcd;
mod migrate;
mod multi_directory;
mod permissions;
mod posix;
mod power_loss;
mod replication;
mod scale;
mod tls;
mod two_clients;
mod writes;
