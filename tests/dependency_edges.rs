//! Fails if a workspace crate gains a dependency edge the architecture forbids.
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
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&output.stdout).expect("metadata JSON");
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
