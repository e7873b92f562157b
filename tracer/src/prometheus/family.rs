//! One metric family: its series, capped at [`MAX_SERIES`], encoded by
//! prometheus-client.

use std::collections::BTreeMap;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

/// Series kept per metric family.
pub const MAX_SERIES: usize = 200;

/// Label names and values of one series, in the order written.
pub type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
pub struct Family {
    name: &'static str,
    kind: MetricType,
    help: &'static str,
    series: BTreeMap<Labels, u64>,
}

impl Family {
    /// A counter: its series are written `NAME_total{...}`.
    pub fn counter(name: &'static str, help: &'static str) -> Self {
        Self::new(name, MetricType::Counter, help)
    }

    pub fn gauge(name: &'static str, help: &'static str) -> Self {
        Self::new(name, MetricType::Gauge, help)
    }

    fn new(name: &'static str, kind: MetricType, help: &'static str) -> Self {
        Self {
            name,
            kind,
            help,
            series: BTreeMap::new(),
        }
    }

    /// Adds `value` to the series (a counter summed over several sources).
    pub fn add(&mut self, labels: Labels, value: u64) {
        *self.series.entry(labels).or_default() += value;
    }

    /// Sets the series to `value` (a gauge).
    pub fn set(&mut self, labels: Labels, value: u64) {
        self.series.insert(labels, value);
    }

    /// The series in label order; beyond [`MAX_SERIES`], the largest
    /// `MAX_SERIES - 1` and one labelled `other` that adds up the rest.
    fn capped(&self) -> Vec<(Labels, u64)> {
        let mut series: Vec<(Labels, u64)> = self
            .series
            .iter()
            .map(|(labels, value)| (labels.clone(), *value))
            .collect();
        if series.len() <= MAX_SERIES {
            return series;
        }
        series.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let rest: u64 = series[MAX_SERIES - 1..].iter().map(|(_, v)| v).sum();
        let other = series[0]
            .0
            .iter()
            .map(|(k, _)| (*k, "other".into()))
            .collect();
        series.truncate(MAX_SERIES - 1);
        series.push((other, rest));
        series
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut metric = encoder.encode_descriptor(self.name, self.help, None, self.kind)?;
        for (labels, value) in self.capped() {
            let series = metric.encode_family(&labels)?;
            match self.kind {
                MetricType::Counter => ConstCounter::new(value).encode(series)?,
                _ => ConstGauge::new(value).encode(series)?,
            }
        }
        Ok(())
    }
}

/// The families of one refresh, in the order served.
#[derive(Debug)]
pub struct Families(pub Vec<Family>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        self.0
            .iter()
            .try_for_each(|family| family.encode(&mut encoder))
    }
}

/// The families as OpenMetrics text, `# EOF` last.
pub fn encode(families: Families) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(families));
    let mut out = String::new();
    // Only the writer can fail, and a String does not.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_capped_and_labels_escaped() {
        let mut family = Family::counter("x", "help");
        for i in 0..(MAX_SERIES as u64 + 10) {
            family.add(vec![("peer", format!("p{i}"))], i + 1);
        }
        family.add(vec![("peer", "a\"b".into())], 1000);
        let out = encode(Families(vec![family]));
        let series: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(series.len(), MAX_SERIES);
        assert!(out.contains("x_total{peer=\"a\\\"b\"} 1000"), "{out}");
        // The 12 smallest (1..=12) add up under `other`.
        assert!(out.contains("x_total{peer=\"other\"} 78"), "{out}");
    }

    #[test]
    fn exposition_is_openmetrics_text() {
        let mut counter = Family::counter("c", "Counted.");
        counter.add(vec![("a", "1".into()), ("b", "2".into())], 3);
        counter.add(vec![("a", "1".into()), ("b", "2".into())], 4);
        let mut gauge = Family::gauge("g", "Gauged.");
        gauge.set(vec![("k", "v".into())], 1);
        let empty = Family::gauge("e", "Nothing yet.");
        assert_eq!(
            encode(Families(vec![counter, gauge, empty])),
            "# HELP c Counted.\n# TYPE c counter\nc_total{a=\"1\",b=\"2\"} 7\n\
             # HELP g Gauged.\n# TYPE g gauge\ng{k=\"v\"} 1\n\
             # HELP e Nothing yet.\n# TYPE e gauge\n\
             # EOF\n"
        );
    }
}
