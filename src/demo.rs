//! The demo mode (cargo feature `demo`): with no upstream configured, the proxy runs in front of
//! the built-in simulated PostHog ([`posthog_sim`]). Only data crosses into the simulator: its
//! settings, the proxy's clock as a time source, and the configured staleness thresholds as
//! durations for the simulator's own tables.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::clock::Clock;
use crate::refresh::{Interval, Thresholds};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:0";
pub const DEFAULT_CALC_DELAY_MS: u64 = 200;
pub const DEFAULT_SEED: u64 = 42;

/// The `[simulator]` section of the configuration file.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatorSection {
    pub listen: String,
    pub calc_delay_ms: u64,
    pub seed: u64,
}

impl Default for SimulatorSection {
    fn default() -> Self {
        Self { listen: DEFAULT_LISTEN.into(), calc_delay_ms: DEFAULT_CALC_DELAY_MS, seed: DEFAULT_SEED }
    }
}

/// The validated demo settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoSettings {
    /// Where the simulator listens; port 0 picks a free one.
    pub listen: String,
    pub calc_delay: Duration,
    pub seed: u64,
}

impl SimulatorSection {
    /// The settings, or what is wrong with `simulator.listen`.
    pub fn validate(&self) -> Result<DemoSettings, String> {
        if self.listen.parse::<SocketAddr>().is_err() {
            return Err(format!("{:?} is not an address", self.listen));
        }
        Ok(DemoSettings {
            listen: self.listen.clone(),
            calc_delay: Duration::from_millis(self.calc_delay_ms),
            seed: self.seed,
        })
    }
}

/// The proxy's clock drives the simulator, so one `advance` ages both sides in tests.
impl posthog_sim::TimeSource for Clock {
    fn now(&self) -> time::OffsetDateTime {
        Clock::now(self)
    }

    fn advance(&self, by: Duration) {
        Clock::advance(self, by);
    }
}

/// The proxy's staleness thresholds, carried over interval by interval (by name) into the
/// simulator's own tables: the demo backend goes stale on the proxy's schedule, so configured
/// tables are visible end to end.
pub fn sim_thresholds(proxy: &Thresholds) -> posthog_sim::Thresholds {
    let mut sim = posthog_sim::Thresholds::posthog();
    for interval in Interval::ALL {
        let Ok(name) = interval.as_str().parse::<posthog_sim::Interval>() else { continue };
        sim.set_default(name, proxy.default_for(interval));
        sim.set_lazy(name, proxy.lazy_for(interval));
    }
    sim
}

/// The demo backend and the address to serve it on: `addr` is `settings.listen`, checked free;
/// port 0 there becomes a free port other than `avoid`'s (the proxy's own addresses, not yet bound).
pub fn start(
    settings: &DemoSettings,
    mut addr: SocketAddr,
    avoid: &[&str],
    thresholds: &Thresholds,
    clock: &Clock,
) -> (SocketAddr, posthog_sim::Simulator) {
    if addr.port() == 0 || settings.listen.ends_with(":0") {
        let own: Vec<u16> = avoid.iter().filter_map(|a| a.parse::<SocketAddr>().ok().map(|a| a.port())).collect();
        let port =
            std::iter::repeat_with(posthog_sim::serve::free_port).find(|p| !own.contains(p)).expect("a free port");
        addr.set_port(port);
    }
    let cfg = posthog_sim::SimConfig {
        calc_delay: settings.calc_delay,
        seed: settings.seed,
        thresholds: sim_thresholds(thresholds),
        ..posthog_sim::SimConfig::default()
    };
    (addr, posthog_sim::Simulator::new(cfg, clock.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_carry_over_as_durations() {
        let mut proxy = Thresholds::posthog();
        proxy.set_default(Interval::Hour, Some(Duration::from_secs(60)));
        proxy.set_lazy(Interval::Day, None);
        let sim = sim_thresholds(&proxy);
        assert_eq!(
            sim.get(posthog_sim::ThresholdMode::Default, posthog_sim::Interval::Hour),
            Some(Duration::from_secs(60))
        );
        assert_eq!(sim.get(posthog_sim::ThresholdMode::Lazy, posthog_sim::Interval::Day), None);
        assert_eq!(sim_thresholds(&Thresholds::posthog()), posthog_sim::Thresholds::posthog());
    }

    #[test]
    fn the_listen_address_is_checked() {
        assert!(SimulatorSection { listen: "nowhere".into(), ..Default::default() }.validate().is_err());
        let ok = SimulatorSection::default().validate().unwrap();
        assert_eq!((ok.listen.as_str(), ok.calc_delay, ok.seed), (DEFAULT_LISTEN, Duration::from_millis(200), 42));
    }
}
