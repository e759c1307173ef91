//! Fails if a workspace crate gains a dependency edge the architecture forbids, or the first
//! build of the README's word-count example gains the AWS SDK, TLS or the bench harness back.
//!
//! Allowed (ARCHITECTURE §2): `blockstore ← receiver`, `blockstore ← operators`,
//! `blockstore, receiver, operators ← engine ← sluice`. Receiver and operators never depend on
//! each other; nothing below the engine depends on it. Dev-dependencies count too, except a crate
//! on itself (for its own test features).

use std::collections::BTreeMap;
use std::process::Command;

fn allowed(from: &str) -> &'static [&'static str] {
    match from {
        "sluice-blockstore" => &[],
        "sluice-receiver" | "sluice-operators" => &["sluice-blockstore"],
        "sluice-engine" => &["sluice-blockstore", "sluice-receiver", "sluice-operators"],
        "sluice" => &[
            "sluice-blockstore",
            "sluice-receiver",
            "sluice-operators",
            "sluice-engine",
        ],
        other => panic!("unknown workspace crate {other}: add it to the allowed edges in this test"),
    }
}

#[test]
fn workspace_crates_only_have_allowed_edges() {
    let meta: serde_json::Value =
        serde_json::from_slice(&cargo(&["metadata", "--format-version", "1", "--no-deps", "--offline"]))
            .expect("metadata JSON");
    let mut edges: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for package in meta["packages"].as_array().expect("packages") {
        let name = package["name"].as_str().expect("name").to_owned();
        let deps = package["dependencies"].as_array().expect("dependencies");
        let internal: Vec<String> = deps
            .iter()
            .filter_map(|d| d["name"].as_str())
            .filter(|d| d.starts_with("sluice") && *d != name)
            .map(str::to_owned)
            .collect();
        edges.insert(name, internal);
    }
    assert_eq!(
        edges.len(),
        5,
        "expected the facade and four crates, found {:?}",
        edges.keys()
    );
    for (from, deps) in &edges {
        for dep in deps {
            assert!(
                allowed(from).contains(&dep.as_str()),
                "{from} depends on {dep}: that edge is not allowed"
            );
        }
    }
}

/// Crates that word count on the local log never uses and that made its first build slow (issue
/// 11): the AWS SDK and its TLS provider, the S3 client's HTTP stack (reqwest, HTTP/2) and TLS,
/// the bench harness. `hyper` itself may be there, as the monitoring server's HTTP/1 server only
/// (see [`the_first_build_has_an_http_server_but_no_http_client`] and docs/benchmarks.md).
const NOT_IN_THE_FIRST_BUILD: [&str; 11] = [
    "aws-config",
    "aws-sdk-kinesis",
    "aws-sdk-dynamodb",
    "aws-lc-rs",
    "ring",
    "rustls",
    "reqwest",
    "hyper-rustls",
    "hyper-tls",
    "h2",
    "criterion",
];

/// `cargo tree` of the facade as the README's first command builds it: its default features, its
/// normal, build and dev dependencies (an example builds the dev-dependencies too), plus `extra`
/// edge kinds, one line per crate (or crate feature) and no indentation.
fn first_build_tree(extra: &str) -> String {
    let edges = format!("normal,build,dev{extra}");
    String::from_utf8(cargo(&[
        "tree",
        "-p",
        "sluice",
        "-e",
        &edges,
        "--prefix",
        "none",
        "--offline",
    ]))
    .expect("UTF-8 tree")
}

/// The standard output of `cargo ARGS` in this workspace; panics with its stderr if it fails.
fn cargo(args: &[&str]) -> Vec<u8> {
    let output = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("run cargo {}: {e}", args.join(" ")));
    assert!(
        output.status.success(),
        "cargo {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// `cargo run --release --example word_count` (the README's first command) builds the facade with
/// its default features and, since it is an example, the facade's dev-dependencies. None of the
/// crates above may be among them: they belong behind the `kinesis` and `s3` features, or to
/// another crate's benches.
#[test]
fn the_first_build_has_no_aws_sdk_tls_or_bench_harness() {
    let tree = first_build_tree("");
    let crates: std::collections::BTreeSet<&str> = tree.lines().filter_map(|line| line.split(' ').next()).collect();
    assert!(crates.contains("sluice-engine"), "not the tree expected: {tree}");
    let found: Vec<&str> = NOT_IN_THE_FIRST_BUILD
        .iter()
        .copied()
        .filter(|name| crates.contains(name))
        .collect();
    assert!(
        found.is_empty(),
        "the word-count example's build compiles {found:?}; see `cargo tree -p sluice -e normal,build,dev -i <crate>`"
    );
}

/// The monitoring server (`--metrics-addr`) brings hyper into the first build, but only its HTTP/1
/// server: hyper's `client` (and `http2`) features are what an HTTP client stack compiles, and
/// they must stay behind the `s3` and `kinesis` features.
#[test]
fn the_first_build_has_an_http_server_but_no_http_client() {
    let tree = first_build_tree(",features");
    let hyper_features: std::collections::BTreeSet<&str> = tree
        .lines()
        .filter_map(|line| line.strip_prefix("hyper feature \""))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert!(
        hyper_features.contains("server"),
        "the monitoring server's hyper is not in the tree: {hyper_features:?}"
    );
    for feature in ["client", "http2"] {
        assert!(
            !hyper_features.contains(feature),
            "the word-count example's build compiles hyper's `{feature}` feature; see `cargo tree -p sluice -e features -i hyper`"
        );
    }
}

/// With every feature (Kinesis, `DynamoDB`, S3) the build has one TLS provider: `ring`, which
/// `object_store`'s S3 client needs for its signing; the AWS SDK uses its rustls client on `ring`
/// too (`sluice_receiver::aws_http_client`) instead of its default one on `aws-lc-rs`, C code
/// built with cmake.
#[test]
fn the_aws_build_has_one_tls_provider() {
    let tree = String::from_utf8(cargo(&[
        "tree",
        "--workspace",
        "--all-features",
        "-e",
        "normal,build,dev",
        "--prefix",
        "none",
        "--offline",
    ]))
    .expect("UTF-8 tree");
    let crates: std::collections::BTreeSet<&str> = tree.lines().filter_map(|line| line.split(' ').next()).collect();
    assert!(
        crates.contains("aws-sdk-kinesis") && crates.contains("ring"),
        "not the tree expected: {tree}"
    );
    for second in ["aws-lc-rs", "aws-lc-sys", "openssl", "native-tls", "s2n-tls"] {
        assert!(
            !crates.contains(second),
            "a second TLS provider, {second}: see `cargo tree --workspace --all-features -i {second}`"
        );
    }
}
