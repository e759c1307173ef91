//! The word-count pipeline and run loop both word-count examples share.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use sluice::engine::{BatchInfo, DStream, StreamingContext};

/// The latest top words with their totals, updated after every batch.
pub type TopWords = Arc<Mutex<Vec<(String, u64)>>>;

/// Splits a line into words (ASCII whitespace), as zero-copy slices of the line.
#[allow(clippy::needless_pass_by_value)] // `flat_map` hands each line over by value
pub fn words(line: Bytes) -> impl Iterator<Item = Bytes> {
    let mut start = 0;
    let mut out = Vec::new();
    for (i, b) in line.iter().enumerate() {
        if b.is_ascii_whitespace() {
            if i > start {
                out.push(line.slice(start..i));
            }
            start = i + 1;
        }
    }
    if line.len() > start {
        out.push(line.slice(start..));
    }
    out.into_iter()
}

/// Word count over `lines`: per-batch counts as Parquet under `output` (a path or a URL), totals
/// with `update_state_by_key`, a progress line per batch. Returns the latest top `top` words.
pub fn count_words(
    ctx: &StreamingContext,
    lines: &DStream<Bytes>,
    output: &str,
    top: usize,
) -> anyhow::Result<TopWords> {
    let counts = lines
        .flat_map(words)
        .count_by_value()
        .map(|(w, c)| (String::from_utf8_lossy(&w).into_owned(), c));
    counts.save_parquet(output)?;
    let totals = counts.update_state_by_key(|_word: &String, new: Vec<u64>, old: Option<u64>| {
        Some(old.unwrap_or(0) + new.iter().sum::<u64>())
    });
    let latest_top: TopWords = Arc::default();
    let keep = latest_top.clone();
    totals.foreach_batch(move |_time, mut all| {
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(top);
        *keep.lock().expect("top words") = all;
        Ok(())
    });
    ctx.add_batch_listener(|info: &BatchInfo| {
        println!(
            "batch {:>14} | {:>8} records | processing {:>5} ms | scheduling delay {:>5} ms{}",
            info.batch_time_ms,
            info.num_records,
            info.processing_delay_ms,
            info.scheduling_delay_ms,
            if info.adopted {
                " | adopted from a dead worker"
            } else {
                ""
            }
        );
    });
    Ok(latest_top)
}

/// Starts `ctx`; with `follow` runs until stopped, else until the input is drained (then a
/// graceful stop and the top words).
pub fn run(
    ctx: &StreamingContext,
    follow: bool,
    timeout: Duration,
    latest_top: &Mutex<Vec<(String, u64)>>,
) -> anyhow::Result<()> {
    ctx.start()?;
    if follow {
        ctx.await_termination()?;
        return Ok(());
    }
    let drained = ctx.await_drained(timeout)?;
    ctx.stop(true)?;
    if !drained {
        bail!("the input was not drained within {timeout:?}");
    }
    let m = ctx.metrics();
    let top = latest_top.lock().expect("top words");
    println!(
        "\nprocessed {} records in {} batches; top {} words in total:",
        m.records_processed,
        m.batches_completed,
        top.len()
    );
    for (word, count) in top.iter() {
        println!("{count:>10}  {word}");
    }
    Ok(())
}
