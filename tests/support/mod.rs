//! Helpers shared by the facade's process-level tests.
#![allow(dead_code)] // each test binary uses a subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The path of a built example. Integration tests live in `target/<profile>/deps`; cargo builds
/// examples into `target/<profile>/examples` before running tests.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run through `cargo test` (it builds examples)",
        path.display()
    );
    path
}

/// The committed word-count Parquet output under `location`, summed per word over batches.
pub fn sum_parquet(location: &Path) -> HashMap<String, u64> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::UInt64Type;
    let mut sums = HashMap::new();
    for (_time, batch) in sluice::operators::ParquetSink::read_committed(&location.display().to_string()).unwrap() {
        let keys = batch.column(0).as_string::<i32>();
        let values = batch.column(1).as_primitive::<UInt64Type>();
        for i in 0..batch.num_rows() {
            *sums.entry(keys.value(i).to_owned()).or_default() += values.value(i);
        }
    }
    sums
}
