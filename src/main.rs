//! The `sluice` command line: manage the embedded local log.
//!
//! ```sh
//! sluice log create --dir .sluice-data/log --stream lines --shards 2
//! cat words.txt | sluice log put --dir .sluice-data/log --stream lines
//! sluice log split --dir .sluice-data/log --stream lines --shard shard-000000
//! sluice log describe --dir .sluice-data/log --stream lines
//! ```

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice::receiver::local_log::cli;

/// Sluice: micro-batch stream processing without losing a record.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the embedded local log.
    #[command(subcommand)]
    Log(LogCommand),
}

#[derive(Debug, clap::Args)]
struct Target {
    /// Directory of the local log.
    #[arg(long, default_value = ".sluice-data/log")]
    dir: PathBuf,
    /// Stream name.
    #[arg(long)]
    stream: String,
}

#[derive(Debug, Subcommand)]
enum LogCommand {
    /// Create a stream with a number of shards.
    Create {
        #[command(flatten)]
        target: Target,
        /// Number of shards.
        #[arg(long, default_value_t = 1)]
        shards: u32,
    },
    /// Append lines (one record each) from files or stdin.
    Put {
        #[command(flatten)]
        target: Target,
        /// Files to read; none or `-` reads stdin.
        files: Vec<PathBuf>,
    },
    /// Split a shard in two at the middle of its hash range (or at `--at`).
    Split {
        #[command(flatten)]
        target: Target,
        /// The shard to split.
        #[arg(long)]
        shard: String,
        /// New starting hash key (decimal); default: the middle of the range.
        #[arg(long)]
        at: Option<u128>,
    },
    /// Merge two adjacent shards.
    Merge {
        #[command(flatten)]
        target: Target,
        /// First shard.
        #[arg(long)]
        shard: String,
        /// Adjacent shard.
        #[arg(long)]
        adjacent: String,
    },
    /// Describe the stream: shards, parents, hash ranges, sequence bounds.
    Describe {
        #[command(flatten)]
        target: Target,
    },
}

fn main() -> anyhow::Result<()> {
    let Cli {
        command: Command::Log(command),
    } = Cli::parse();
    match command {
        LogCommand::Create { target, shards } => {
            print!("{}", cli::create(&target.dir, &target.stream, shards)?);
        }
        LogCommand::Put { target, files } => {
            if files.is_empty() || files.iter().any(|f| f.as_os_str() == "-") {
                let stdin = std::io::stdin().lock();
                print!(
                    "{}",
                    cli::put(&target.dir, &target.stream, stdin, cli::KeyMode::Counter)?
                );
            }
            for file in files.iter().filter(|f| f.as_os_str() != "-") {
                let reader: Box<dyn BufRead> = Box::new(std::io::BufReader::new(
                    std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
                ));
                print!(
                    "{}",
                    cli::put(&target.dir, &target.stream, reader, cli::KeyMode::Counter)?
                );
            }
        }
        LogCommand::Split { target, shard, at } => {
            print!("{}", cli::split(&target.dir, &target.stream, &shard, at)?);
        }
        LogCommand::Merge {
            target,
            shard,
            adjacent,
        } => {
            print!("{}", cli::merge(&target.dir, &target.stream, &shard, &adjacent)?);
        }
        LogCommand::Describe { target } => {
            print!("{}", cli::describe(&target.dir, &target.stream)?);
        }
    }
    Ok(())
}
