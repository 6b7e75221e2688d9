//! Kubernetes resource quantities (`100m`, `1.5`, `2Gi`, `500M`, `1e3`) as the integers the
//! scheduler compares: CPU in millicores, everything else in whole units rounded up, as
//! `Quantity.MilliValue()` and `Quantity.Value()` give them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a Kubernetes quantity")]
pub struct QuantityError(pub String);

/// The quantity in thousandths of its unit, rounded up (`100m` is 100, `2Ki` is 2,048,000).
pub fn milli_value(text: &str) -> Result<i128, QuantityError> {
    let bad = || QuantityError(text.to_string());
    let s = text.trim();
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(bad());
    }
    let digits = format!("{whole}{fraction}");
    if digits.len() > 30 {
        return Err(bad());
    }
    let mantissa: i128 = digits.parse().map_err(|_| bad())?;
    let binary = |power: u32| 1024i128.pow(power);
    let (times, over) = match suffix {
        "" => (1, 1),
        "Ki" => (binary(1), 1),
        "Mi" => (binary(2), 1),
        "Gi" => (binary(3), 1),
        "Ti" => (binary(4), 1),
        "Pi" => (binary(5), 1),
        "Ei" => (binary(6), 1),
        "n" => (1, 1_000_000_000),
        "u" => (1, 1_000_000),
        "m" => (1, 1_000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        exponent => {
            let e = exponent
                .strip_prefix(['e', 'E'])
                .and_then(|e| e.parse::<i32>().ok())
                .filter(|e| e.abs() <= 18)
                .ok_or_else(bad)?;
            let power = 10i128.pow(e.unsigned_abs());
            if e >= 0 {
                (power, 1)
            } else {
                (1, power)
            }
        }
    };
    // value = mantissa * numerator / denominator
    let numerator = 1000i128.checked_mul(times).ok_or_else(bad)?;
    let denominator = 10i128
        .checked_pow(fraction.len() as u32)
        .and_then(|d| d.checked_mul(over))
        .ok_or_else(bad)?;
    let scaled = mantissa.checked_mul(numerator).ok_or_else(bad)?;
    // Rounded up, as Kubernetes rounds quantities it cannot represent exactly.
    // (Without `scaled + denominator - 1`, which could overflow.)
    let milli = scaled / denominator + i128::from(scaled % denominator != 0);
    Ok(if negative { -milli } else { milli })
}

fn saturate(v: i128) -> i64 {
    v.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// The resources the scheduler counts, from a resource list (requests or allocatable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: i64,
    /// Bytes.
    pub memory: i64,
    /// Bytes.
    pub ephemeral_storage: i64,
    /// How many pods (allocatable only).
    pub pods: i64,
    /// Extended resources, hugepages and the like, in whole units.
    pub scalar: BTreeMap<String, i64>,
}

impl Resources {
    /// Reads a resource list; a malformed quantity is an error naming it.
    pub fn from_list(list: &BTreeMap<String, Quantity>) -> Result<Self, QuantityError> {
        let mut r = Resources::default();
        for (name, q) in list {
            r.set(name, milli_value(&q.0)?);
        }
        Ok(r)
    }

    /// Sets one resource from its milli-value.
    pub fn set(&mut self, name: &str, milli: i128) {
        let whole = saturate(milli.saturating_add(999).div_euclid(1000));
        match name {
            "cpu" => self.milli_cpu = saturate(milli),
            "memory" => self.memory = whole,
            "ephemeral-storage" => self.ephemeral_storage = whole,
            "pods" => self.pods = whole,
            other => {
                self.scalar.insert(other.to_string(), whole);
            }
        }
    }

    pub fn add(&mut self, other: &Resources) {
        self.milli_cpu = self.milli_cpu.saturating_add(other.milli_cpu);
        self.memory = self.memory.saturating_add(other.memory);
        self.ephemeral_storage = self
            .ephemeral_storage
            .saturating_add(other.ephemeral_storage);
        self.pods = self.pods.saturating_add(other.pods);
        for (k, v) in &other.scalar {
            let e = self.scalar.entry(k.clone()).or_insert(0);
            *e = e.saturating_add(*v);
        }
    }

    pub fn subtract(&mut self, other: &Resources) {
        self.milli_cpu = self.milli_cpu.saturating_sub(other.milli_cpu);
        self.memory = self.memory.saturating_sub(other.memory);
        self.ephemeral_storage = self
            .ephemeral_storage
            .saturating_sub(other.ephemeral_storage);
        self.pods = self.pods.saturating_sub(other.pods);
        for (k, v) in &other.scalar {
            let e = self.scalar.entry(k.clone()).or_insert(0);
            *e = e.saturating_sub(*v);
        }
        self.scalar.retain(|_, v| *v != 0);
    }

    /// Each resource the larger of the two.
    pub fn max_with(&mut self, other: &Resources) {
        self.milli_cpu = self.milli_cpu.max(other.milli_cpu);
        self.memory = self.memory.max(other.memory);
        self.ephemeral_storage = self.ephemeral_storage.max(other.ephemeral_storage);
        self.pods = self.pods.max(other.pods);
        for (k, v) in &other.scalar {
            let e = self.scalar.entry(k.clone()).or_insert(0);
            *e = (*e).max(*v);
        }
    }

    pub fn scalar(&self, name: &str) -> i64 {
        self.scalar.get(name).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_read_as_kubernetes_reads_them() {
        assert_eq!(milli_value("100m"), Ok(100));
        assert_eq!(milli_value("1"), Ok(1000));
        assert_eq!(milli_value("1.5"), Ok(1500));
        assert_eq!(milli_value("0.1"), Ok(100));
        assert_eq!(milli_value("2Ki"), Ok(2_048_000));
        assert_eq!(milli_value("1Gi"), Ok(1_073_741_824_000));
        assert_eq!(milli_value("500M"), Ok(500_000_000_000));
        assert_eq!(milli_value("1e3"), Ok(1_000_000));
        assert_eq!(milli_value("12E-1"), Ok(1200));
        assert_eq!(milli_value("1n"), Ok(1), "rounded up");
        assert_eq!(milli_value("-2"), Ok(-2000));
        for bad in ["", "m", "1.2.3", "1x", "Gi", "1e", "1e99"] {
            assert!(milli_value(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn quantities_too_large_for_the_arithmetic_are_errors_not_panics() {
        let fraction = format!(".{}", "1".repeat(30));
        let big = "9".repeat(30);
        for text in [
            format!("{fraction}n"),
            format!("{fraction}e-18"),
            format!("{fraction}E-10"),
            format!("{big}Ei"),
            format!("{big}e18"),
            format!("-{big}E"),
        ] {
            assert_eq!(
                milli_value(&text),
                Err(QuantityError(text.clone())),
                "{text:?}"
            );
        }
        // Near the limits, but they fit.
        assert_eq!(milli_value(&format!("{fraction}m")), Ok(1), "rounded up");
        assert_eq!(milli_value(&format!("{fraction}u")), Ok(1), "rounded up");
        assert!(milli_value(&format!("{big}k")).is_ok());
        // Rounding up does not overflow when the scaled value is near i128::MAX.
        assert_eq!(
            milli_value("0.000170141183460469231e18"),
            Ok(170_141_183_460_469_231)
        );
        assert!(
            milli_value("0.000170141183460469232e18").is_err(),
            "one more is too many"
        );
    }

    #[test]
    fn resource_lists_count_cpu_in_millicores_and_the_rest_in_units() {
        let list: BTreeMap<String, Quantity> = [
            ("cpu", "250m"),
            ("memory", "1Mi"),
            ("pods", "110"),
            ("example.com/gpu", "2"),
            ("ephemeral-storage", "1.5k"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect();
        let r = Resources::from_list(&list).unwrap();
        assert_eq!(r.milli_cpu, 250);
        assert_eq!(r.memory, 1_048_576);
        assert_eq!(r.pods, 110);
        assert_eq!(r.ephemeral_storage, 1500);
        assert_eq!(r.scalar("example.com/gpu"), 2);
        let mut bad = list.clone();
        bad.insert("cpu".into(), Quantity("lots".into()));
        assert!(Resources::from_list(&bad).is_err());
    }
}
