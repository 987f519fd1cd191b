//! Generated code for metald's API (`proto/metald/v1`): messages, the `VmService` trait servers
//! implement, and the `VmServiceClient` that metaldctl and tests use.
#![allow(missing_docs, clippy::all)]

connectrpc::include_generated!();
