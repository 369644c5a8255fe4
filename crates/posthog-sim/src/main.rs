//! `posthog-sim`: the simulated PostHog insights backend on its own.

use std::process::ExitCode;

use clap::Parser;

/// A simulated PostHog insights backend (deterministic demo data, PostHog's refresh semantics).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    args: posthog_sim::cli::Args,
}

fn main() -> ExitCode {
    posthog_sim::cli::run("posthog-sim", &Cli::parse().args)
}
