//! The simulator's command line: the `posthog-sim` binary, and the proxy's `simulate` subcommand
//! (demo builds), share these arguments and [`run`].

use std::process::ExitCode;
use std::time::Duration;

use crate::{serve, SimClock, SimConfig, Simulator, Thresholds};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, default_value = "127.0.0.1:8010")]
    pub listen: String,
    /// How long one calculation takes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub calc_delay_ms: u64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Concurrent calculations per team before `concurrency_limit_exceeded` (0 = unlimited).
    #[arg(long, default_value_t = 3)]
    pub concurrency_limit: usize,
    /// Per personal API key and minute on the insights endpoints, as PostHog (0 = off).
    #[arg(long, default_value_t = 0)]
    pub rate_limit_per_minute: u32,
    /// Per personal API key and hour (0 = off).
    #[arg(long, default_value_t = 0)]
    pub rate_limit_per_hour: u32,
    /// Staleness threshold for every interval, in seconds (lazy: twice it). Default: PostHog's table.
    #[arg(long)]
    pub staleness_seconds: Option<u64>,
}

impl Args {
    /// The simulator these arguments describe.
    pub fn config(&self) -> SimConfig {
        let rate_limit = match (self.rate_limit_per_minute, self.rate_limit_per_hour) {
            (0, 0) => None,
            (m, h) => Some((if m == 0 { u32::MAX } else { m }, if h == 0 { u32::MAX } else { h })),
        };
        let thresholds = match self.staleness_seconds.map(|s| s.max(1)) {
            Some(s) => Thresholds::uniform(Duration::from_secs(s), Duration::from_secs(s * 2)),
            None => Thresholds::posthog(),
        };
        SimConfig {
            calc_delay: Duration::from_millis(self.calc_delay_ms),
            seed: self.seed,
            concurrency_limit: (self.concurrency_limit > 0).then_some(self.concurrency_limit),
            rate_limit,
            thresholds,
        }
    }
}

/// Serves the simulator until the process is signalled. `name` prefixes error messages.
pub fn run(name: &str, args: &Args) -> ExitCode {
    let listen = args.listen.as_str();
    // pingora retries a busy port for 30 s and then panics: check first and fail clearly.
    if let Err(e) = std::net::TcpListener::bind(listen) {
        eprintln!("{name}: cannot listen on {listen}: {e}");
        return ExitCode::from(1);
    }
    let sim = Simulator::new(args.config(), SimClock::new());
    let srv = serve::server(&sim, listen, 2);
    println!(
        "Simulated PostHog insights backend on http://{listen} (credentials: phx_demo_all, phx_demo_p1, phx_demo_p2)"
    );
    srv.run_forever()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn zero_means_off_and_staleness_is_uniform() {
        let cfg = Cli::parse_from(["sim", "--concurrency-limit", "0", "--rate-limit-per-hour", "9"]).args.config();
        assert_eq!((cfg.concurrency_limit, cfg.rate_limit), (None, Some((u32::MAX, 9))));
        assert_eq!(cfg.thresholds, Thresholds::posthog());
        let cfg = Cli::parse_from(["sim", "--staleness-seconds", "30"]).args.config();
        assert_eq!(cfg.thresholds, Thresholds::uniform(Duration::from_secs(30), Duration::from_secs(60)));
    }
}
