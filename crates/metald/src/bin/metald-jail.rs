//! `metald-jail SPEC`: what metald starts in place of each VMM. It builds the VM's jail
//! described by the JSON SPEC ([`metald::jailer::child`]) and execs the VMM in it; it returns
//! only if the jail could not be built, with the step on stderr (the VM's VMM log).
//!
//! `metald-jail spawner`: starts jail children for metald, its requests on stdin (a socket),
//! holding none of metald's descriptors ([`metald::spawner`]).
//!
//! `metald-jail warm SPEC`: a jail started ahead of boots: builds what every VM's jail of a
//! kind has, then waits on its socket (stdin) for the VM it becomes
//! ([`metald::jailer::warm`]).
//!
//! `metald-jail netns-nft NETNS NFT`: enters the network namespace pinned at NETNS and execs
//! `NFT -f -` with the script on stdin (a clone's address map,
//! [`metald::network::clone_map`]): namespace work in a fresh process, never a runtime thread.
//!
//! A binary of its own rather than a subcommand of metald: every VMM start execs it, and the
//! daemon's binary (about 28 MB with the API, TLS and telemetry) took about 4.5 ms longer to
//! exec and load than this one (issue 14's per-step profile). Nothing else runs before the jail:
//! no configuration, no logging, no threads.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.len() == 1 && args.first().is_some_and(|a| a == "spawner") {
        return match metald::spawner::serve() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("metald-jail spawner: {e}");
                ExitCode::from(1)
            }
        };
    }
    if let [verb, netns, nft] = args.as_slice() {
        if verb == "netns-nft" {
            let netns = std::path::Path::new(netns);
            return match metald::network::clone_map::enter_and_exec(netns, nft.as_ref()) {
                Ok(never) => match never {},
                Err(e) => {
                    eprintln!("metald-jail netns-nft {}: {e}", netns.display());
                    ExitCode::from(1)
                }
            };
        }
    }
    if let [verb, spec] = args.as_slice() {
        if verb == "warm" {
            let spec: metald::jailer::warm::WarmSpec = match parse_spec(spec) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("metald-jail warm: bad spec: {e}");
                    return ExitCode::from(2);
                }
            };
            return match metald::jailer::child::serve_warm(&spec) {
                Ok(never) => match never {},
                Err(e) => {
                    // Reported on its socket too; stderr is the VM's VMM log once it has one.
                    eprintln!("{}", metald::report::chain(&e));
                    ExitCode::from(1)
                }
            };
        }
    }
    let mut args = args.into_iter();
    let (Some(spec), None) = (args.next(), args.next()) else {
        eprintln!("usage: metald-jail SPEC (started by metald for each VMM)");
        return ExitCode::from(2);
    };
    let spec: metald::jailer::JailSpec = match parse_spec(&spec) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("metald-jail: bad spec: {e}");
            return ExitCode::from(2);
        }
    };
    match metald::jailer::child::run(&spec) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("{} (VM {})", metald::report::chain(&e), spec.vmm.vm_id);
            ExitCode::from(1)
        }
    }
}

/// A spec given as the JSON argument.
fn parse_spec<T: serde::de::DeserializeOwned>(arg: &std::ffi::OsStr) -> Result<T, String> {
    arg.to_str()
        .ok_or_else(|| "not UTF-8".to_string())
        .and_then(|s| serde_json::from_str(s).map_err(|e| e.to_string()))
}
