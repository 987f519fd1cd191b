//! Generates metald.v1 and billing.v1 messages, service traits and clients from `proto/`.

fn main() {
    let proto_root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    if let Err(e) = connectrpc_build::Config::new()
        .files(&[
            format!("{proto_root}/metald/v1/vm.proto"),
            format!("{proto_root}/billing/v1/billing.proto"),
        ])
        .includes(&[proto_root])
        .include_file("_connectrpc.rs")
        .compile()
    {
        // A build script reports failure by panicking; say what broke.
        panic!("generating code from {proto_root}: {e}");
    }
}
