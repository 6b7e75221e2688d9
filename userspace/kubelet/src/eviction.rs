//! The hard eviction thresholds (`--eviction-hard`, the kubelet's syntax
//! `memory.available<100Mi,nodefs.available<10%,pid.available<5%`), which are what the Node's
//! pressure conditions mean. Signals not given keep the kubelet's defaults.

use seine_apimachinery::quantity::milli_value;

use crate::machine::Available;

/// A threshold: an amount, or a share of the total.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    Amount(u64),
    Percent(f64),
}

impl Threshold {
    /// Whether `available` of `total` is below the threshold (never, when the total is unknown).
    fn crossed(self, available: u64, total: u64) -> bool {
        match self {
            Threshold::Amount(min) => available < min,
            Threshold::Percent(p) => total > 0 && (available as f64) < total as f64 * p / 100.0,
        }
    }

    /// The amount it keeps back of `total` (what capacity is more than allocatable by).
    pub fn of(self, total: u64) -> u64 {
        match self {
            Threshold::Amount(a) => a.min(total),
            Threshold::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub memory_available: Threshold,
    pub nodefs_available: Threshold,
    pub pid_available: Threshold,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            memory_available: Threshold::Amount(100 << 20),
            nodefs_available: Threshold::Percent(10.0),
            pid_available: Threshold::Percent(5.0),
        }
    }
}

/// Which pressures the machine is under now.
pub struct Pressure {
    pub memory: bool,
    pub disk: bool,
    pub pid: bool,
}

impl Thresholds {
    /// The defaults, with each `signal<value` of `text` (comma separated) in place.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut thresholds = Thresholds::default();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (signal, value) = item
                .split_once('<')
                .ok_or_else(|| format!("{item:?} is not signal<value"))?;
            let threshold = match value.strip_suffix('%') {
                Some(p) => match p.parse::<f64>() {
                    Ok(p) if (0.0..=100.0).contains(&p) => Threshold::Percent(p),
                    _ => return Err(format!("{item:?}: {value:?} is not a percentage")),
                },
                None => match milli_value(value) {
                    Ok(m) if m >= 0 => {
                        Threshold::Amount(u64::try_from(m / 1000).unwrap_or(u64::MAX))
                    }
                    _ => return Err(format!("{item:?}: {value:?} is not a quantity")),
                },
            };
            match signal {
                "memory.available" => thresholds.memory_available = threshold,
                "nodefs.available" => thresholds.nodefs_available = threshold,
                "pid.available" => thresholds.pid_available = threshold,
                _ => {
                    return Err(format!(
                        "{signal:?} is not a signal here (memory.available, nodefs.available, pid.available)"
                    ))
                }
            }
        }
        Ok(thresholds)
    }

    pub fn pressure(&self, available: &Available) -> Pressure {
        Pressure {
            memory: self
                .memory_available
                .crossed(available.memory_bytes, available.memory_total_bytes),
            disk: self
                .nodefs_available
                .crossed(available.nodefs_bytes, available.nodefs_total_bytes),
            pid: self.pid_available.crossed(
                available.pid_max.saturating_sub(available.pids),
                available.pid_max,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_signals_replace_the_defaults_and_the_rest_stay() {
        let t = Thresholds::parse("memory.available<1Gi, nodefs.available<2.5%").unwrap();
        assert_eq!(t.memory_available, Threshold::Amount(1 << 30));
        assert_eq!(t.nodefs_available, Threshold::Percent(2.5));
        assert_eq!(t.pid_available, Thresholds::default().pid_available);
        assert_eq!(Thresholds::parse("").unwrap(), Thresholds::default());
    }

    #[test]
    fn bad_thresholds_say_what_is_wrong() {
        for (text, says) in [
            ("memory.available=1Gi", "signal<value"),
            ("nodefs.available<110%", "percentage"),
            ("memory.available<lots", "quantity"),
            ("imagefs.inodesFree<5%", "not a signal"),
        ] {
            let e = Thresholds::parse(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
