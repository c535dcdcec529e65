//! What `rill-bench load` reports: one [`Outcome`] per (workload, durability, system), as
//! JSON, as a markdown table with rill/peer ratios, and as an SVG chart.
//!
//! The chart is written by hand (about 150 lines) rather than with `plotters`: it is two
//! panels of grouped bars on log axes, which needs nothing a plotting library adds, and it
//! keeps the benchmark crate free of another dependency tree to build in CI.

use std::fmt::Write as _;

/// Latency percentiles of one run, in µs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest value.
    pub max_us: f64,
    /// Messages measured.
    pub count: u64,
}

impl Percentiles {
    /// The percentiles of an hdrhistogram of µs values.
    pub fn of(hist: &hdrhistogram::Histogram<u64>) -> Percentiles {
        Percentiles {
            p50_us: hist.value_at_quantile(0.5) as f64,
            p99_us: hist.value_at_quantile(0.99) as f64,
            p999_us: hist.value_at_quantile(0.999) as f64,
            max_us: hist.max() as f64,
            count: hist.len(),
        }
    }
}

/// The result of one workload on one system at one durability.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// `rill-embedded`, `rill-server`, `rill-server-producer`, `rill-kafka`, `redis` or `nats`.
    pub system: String,
    /// `produce`, `e2e`, `fanout` or `replay`.
    pub workload: String,
    /// `always`, `relaxed` or `none` (see `Durability`).
    pub durability: String,
    /// `closed` or `open@RATE`.
    pub mode: String,
    /// Parameters of the run (message size, producers, ...), in print order.
    pub params: Vec<(String, String)>,
    /// Messages per second: acknowledged (produce), or received per consumer (replay).
    pub msgs_per_s: f64,
    /// Message payload megabytes (10^6 B) per second.
    pub mb_per_s: f64,
    /// What `latency` measures: `ack` (intended send -> acknowledgement) or `e2e`
    /// (intended send -> a consumer holds it).
    pub latency_kind: String,
    /// Latency percentiles, where measured.
    pub latency: Option<Percentiles>,
    /// Further figures (fsyncs/s, bytes per fsync, messages lost, ...).
    pub extra: Vec<(String, f64)>,
}

/// A JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON number (`null` for NaN and infinities, which JSON cannot hold).
pub fn json_number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

impl Outcome {
    /// One JSON object.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{");
        let _ = write!(
            s,
            "\"system\":{},\"workload\":{},\"durability\":{},\"mode\":{},\"msgs_per_s\":{},\"mb_per_s\":{},\"latency_kind\":{}",
            json_string(&self.system),
            json_string(&self.workload),
            json_string(&self.durability),
            json_string(&self.mode),
            json_number(self.msgs_per_s),
            json_number(self.mb_per_s),
            json_string(&self.latency_kind),
        );
        match &self.latency {
            Some(p) => {
                let _ = write!(
                    s,
                    ",\"latency_us\":{{\"p50\":{},\"p99\":{},\"p99_9\":{},\"max\":{},\"count\":{}}}",
                    json_number(p.p50_us),
                    json_number(p.p99_us),
                    json_number(p.p999_us),
                    json_number(p.max_us),
                    p.count
                );
            }
            None => s.push_str(",\"latency_us\":null"),
        }
        s.push_str(",\"params\":{");
        let params: Vec<String> =
            self.params.iter().map(|(k, v)| format!("{}:{}", json_string(k), json_string(v))).collect();
        s.push_str(&params.join(","));
        s.push_str("},\"extra\":{");
        let extra: Vec<String> =
            self.extra.iter().map(|(k, v)| format!("{}:{}", json_string(k), json_number(*v))).collect();
        s.push_str(&extra.join(","));
        s.push_str("}}");
        s
    }

    fn group(&self) -> String {
        format!("{} {} {}", self.workload, self.durability, self.mode)
    }

    fn is_rill(&self) -> bool {
        self.system.starts_with("rill")
    }
}

/// A JSON document: `{"meta": {...}, "results": [...]}`.
pub fn to_json(meta: &[(String, String)], outcomes: &[Outcome]) -> String {
    let meta: Vec<String> = meta.iter().map(|(k, v)| format!("{}:{}", json_string(k), json_string(v))).collect();
    let results: Vec<String> = outcomes.iter().map(Outcome::to_json).collect();
    format!("{{\"meta\":{{{}}},\"results\":[\n{}\n]}}\n", meta.join(","), results.join(",\n"))
}

fn ms(us: f64) -> String {
    let v = us / 1e3;
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A figure with thousands separators (rates) or three significant decimals (ratios).
pub fn human(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    if v.abs() >= 1000.0 {
        let digits = format!("{:.0}", v.abs());
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if v < 0.0 {
            out.insert(0, '-');
        }
        out
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The markdown results table, then the rill/peer ratios of every group that has both.
pub fn to_markdown(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    s.push_str("| workload | durability | mode | system | msg/s | MB/s | latency | p50 ms | p99 ms | p99.9 ms | max ms | other |\n");
    s.push_str("|---|---|---|---|--:|--:|---|--:|--:|--:|--:|---|\n");
    for o in outcomes {
        let (p50, p99, p999, max) = match &o.latency {
            Some(p) => (ms(p.p50_us), ms(p.p99_us), ms(p.p999_us), ms(p.max_us)),
            None => ("–".into(), "–".into(), "–".into(), "–".into()),
        };
        let extra: Vec<String> = o.extra.iter().map(|(k, v)| format!("{k} {}", human(*v))).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {p50} | {p99} | {p999} | {max} | {} |",
            o.workload,
            o.durability,
            o.mode,
            o.system,
            human(o.msgs_per_s),
            human(o.mb_per_s),
            if o.latency.is_some() { o.latency_kind.as_str() } else { "–" },
            extra.join(", ")
        );
    }
    let ratios = ratios(outcomes);
    if !ratios.is_empty() {
        s.push_str("\nRatios rill/peer (throughput: higher is better for rill; p99: lower is better for rill)\n\n");
        s.push_str(
            "| workload | durability | mode | rill | peer | msg/s ratio | p99 ratio |\n|---|---|---|---|---|--:|--:|\n",
        );
        for r in ratios {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.workload,
                r.durability,
                r.mode,
                r.rill,
                r.peer,
                human(r.throughput),
                human(r.p99)
            );
        }
    }
    s
}

/// One rill system against one peer in the same group.
#[derive(Clone, Debug, PartialEq)]
pub struct Ratio {
    /// Workload of the group.
    pub workload: String,
    /// Durability of the group.
    pub durability: String,
    /// Mode of the group.
    pub mode: String,
    /// The rill system.
    pub rill: String,
    /// The peer.
    pub peer: String,
    /// rill msg/s ÷ peer msg/s.
    pub throughput: f64,
    /// rill p99 ÷ peer p99 (NaN where either lacks a latency).
    pub p99: f64,
}

/// rill/peer ratios for every group (workload, durability, mode) holding both.
pub fn ratios(outcomes: &[Outcome]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for rill in outcomes.iter().filter(|o| o.is_rill()) {
        for peer in outcomes.iter().filter(|o| !o.is_rill() && o.group() == rill.group()) {
            let p99 = match (&rill.latency, &peer.latency) {
                (Some(r), Some(p)) if p.p99_us > 0.0 => r.p99_us / p.p99_us,
                _ => f64::NAN,
            };
            out.push(Ratio {
                workload: rill.workload.clone(),
                durability: rill.durability.clone(),
                mode: rill.mode.clone(),
                rill: rill.system.clone(),
                peer: peer.system.clone(),
                throughput: rill.msgs_per_s / peer.msgs_per_s,
                p99,
            });
        }
    }
    out
}

/// The colour of a system's bars.
fn colour(system: &str) -> &'static str {
    match system {
        "rill-embedded" => "#1b9e77",
        "rill-server" => "#66a61e",
        "rill-server-producer" => "#a6d854",
        "rill-kafka" => "#e6ab02",
        "redis" => "#d95f02",
        "nats" => "#7570b3",
        _ => "#666666",
    }
}

/// A log10 axis over `[min, max]`, widened to whole decades.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogAxis {
    lo: f64,
    hi: f64,
}

impl LogAxis {
    /// The decades covering every positive finite value; `None` if there is none.
    pub fn covering(values: impl IntoIterator<Item = f64>) -> Option<LogAxis> {
        let positive: Vec<f64> = values.into_iter().filter(|v| v.is_finite() && *v > 0.0).collect();
        let min = positive.iter().copied().fold(f64::INFINITY, f64::min);
        let max = positive.iter().copied().fold(0.0, f64::max);
        if positive.is_empty() {
            return None;
        }
        let lo = min.log10().floor();
        let hi = max.log10().ceil().max(lo + 1.0);
        Some(LogAxis { lo, hi })
    }

    /// Where `v` falls, 0 (bottom) to 1 (top), clamped.
    pub fn fraction(&self, v: f64) -> f64 {
        if !(v.is_finite() && v > 0.0) {
            return 0.0;
        }
        ((v.log10() - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)
    }

    /// The decade values from bottom to top.
    pub fn decades(&self) -> Vec<f64> {
        let (lo, hi) = (self.lo as i32, self.hi as i32);
        (lo..=hi).map(|e| 10f64.powi(e)).collect()
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Two panels of bars, one group per (workload, durability, mode) and one bar per system:
/// throughput (msg/s) on top; latency below, the bar up to p99 with marks at p50 (white),
/// p99.9 and max (black). Both axes are log10.
pub fn to_svg(title: &str, outcomes: &[Outcome]) -> String {
    let mut groups: Vec<String> = Vec::new();
    for o in outcomes {
        if !groups.contains(&o.group()) {
            groups.push(o.group());
        }
    }
    let mut systems: Vec<String> = Vec::new();
    for o in outcomes {
        if !systems.contains(&o.system) {
            systems.push(o.system.clone());
        }
    }
    let bar_w = 18.0;
    let group_w = (systems.len().max(1) as f64) * bar_w + 30.0;
    let (left, panel_h, gap) = (80.0, 220.0, 90.0);
    let width = left + group_w * groups.len().max(1) as f64 + 160.0;
    let top1 = 50.0;
    let top2 = top1 + panel_h + gap;
    let height = top2 + panel_h + 110.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    // The full title goes in <desc>; the visible one is cut to the chart's width.
    let fits = ((width - left) / 8.0) as usize;
    let shown: String = if title.chars().count() > fits {
        title.chars().take(fits.saturating_sub(1)).chain(std::iter::once('…')).collect()
    } else {
        title.to_string()
    };
    let _ = writeln!(s, "<desc>{}</desc>", xml(title));
    let _ = writeln!(s, "<text x=\"{left}\" y=\"24\" font-size=\"15\">{}</text>", xml(&shown));
    let throughput = LogAxis::covering(outcomes.iter().map(|o| o.msgs_per_s));
    let latency = LogAxis::covering(outcomes.iter().filter_map(|o| o.latency).flat_map(|p| [p.p50_us, p.max_us]));
    let panels: [(f64, &str, Option<LogAxis>); 2] = [
        (top1, "throughput, msg/s", throughput),
        (top2, "latency, ms (bar: p99; marks: p50 white, p99.9 and max black)", latency),
    ];
    for (top, label, axis) in panels {
        let bottom = top + panel_h;
        let _ = writeln!(s, "<text x=\"{left}\" y=\"{:.0}\" font-size=\"12\">{}</text>", top - 8.0, xml(label));
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{bottom}\" stroke=\"black\"/><line x1=\"{left}\" y1=\"{bottom}\" x2=\"{:.0}\" y2=\"{bottom}\" stroke=\"black\"/>",
            width - 150.0
        );
        let Some(axis) = axis else { continue };
        let is_latency = top == top2;
        for d in axis.decades() {
            let y = bottom - axis.fraction(d) * panel_h;
            let text = if is_latency { format!("{}", d / 1e3) } else { human(d) };
            let _ = writeln!(
                s,
                "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.0}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">{text}</text>",
                width - 150.0,
                left - 4.0,
                y + 4.0
            );
        }
        for (g, group) in groups.iter().enumerate() {
            let gx = left + 15.0 + g as f64 * group_w;
            for (i, system) in systems.iter().enumerate() {
                let Some(o) = outcomes.iter().find(|o| &o.group() == group && &o.system == system) else { continue };
                let x = gx + i as f64 * bar_w;
                let value = if is_latency { o.latency.map(|p| p.p99_us) } else { Some(o.msgs_per_s) };
                let Some(value) = value else { continue };
                let y = bottom - axis.fraction(value) * panel_h;
                let _ = writeln!(
                    s,
                    "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} {}: {}</title></rect>",
                    bar_w - 3.0,
                    bottom - y,
                    colour(system),
                    xml(system),
                    xml(group),
                    if is_latency { format!("p99 {} ms", ms(value)) } else { format!("{} msg/s", human(value)) }
                );
                if let (true, Some(p)) = (is_latency, o.latency) {
                    for (v, c) in [(p.p50_us, "white"), (p.p999_us, "black"), (p.max_us, "black")] {
                        let y = bottom - axis.fraction(v) * panel_h;
                        let _ = writeln!(
                            s,
                            "<line x1=\"{x:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{c}\" stroke-width=\"2\"/>",
                            x + bar_w - 3.0
                        );
                    }
                }
            }
            let _ = writeln!(
                s,
                "<text transform=\"translate({:.1},{:.1}) rotate(30)\">{}</text>",
                gx,
                bottom + 14.0,
                xml(group)
            );
        }
    }
    for (i, system) in systems.iter().enumerate() {
        let y = top1 + 10.0 + i as f64 * 18.0;
        let x = width - 140.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x:.0}\" y=\"{y:.0}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{:.0}\" y=\"{:.0}\">{}</text>",
            colour(system),
            x + 16.0,
            y + 10.0,
            xml(system)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(system: &str, rate: f64, p99_us: Option<f64>) -> Outcome {
        Outcome {
            system: system.into(),
            workload: "produce".into(),
            durability: "always".into(),
            mode: "closed".into(),
            params: vec![("message_size".into(), "100".into())],
            msgs_per_s: rate,
            mb_per_s: rate * 100.0 / 1e6,
            latency_kind: "ack".into(),
            latency: p99_us.map(|p| Percentiles {
                p50_us: p / 2.0,
                p99_us: p,
                p999_us: p * 2.0,
                max_us: p * 4.0,
                count: 10,
            }),
            extra: vec![("fsyncs/s".into(), 5000.0)],
        }
    }

    #[test]
    fn json_escapes_and_nulls() {
        assert_eq!(json_string("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
        assert_eq!(json_number(f64::NAN), "null");
        assert_eq!(json_number(1.5), "1.5");
        let o = outcome("redis", 1000.0, None);
        let j = o.to_json();
        assert!(j.starts_with("{\"system\":\"redis\",\"workload\":\"produce\""), "{j}");
        assert!(j.contains("\"latency_us\":null"), "{j}");
        assert!(j.contains("\"params\":{\"message_size\":\"100\"}"), "{j}");
        assert!(j.contains("\"extra\":{\"fsyncs/s\":5000}"), "{j}");
        let j = outcome("nats", 1000.0, Some(200.0)).to_json();
        assert!(j.contains("\"latency_us\":{\"p50\":100,\"p99\":200,\"p99_9\":400,\"max\":800,\"count\":10}"), "{j}");
        // Balanced braces: a cheap structural check without a JSON parser.
        let doc = to_json(&[("date".into(), "x".into())], &[o.clone(), o]);
        assert_eq!(doc.matches('{').count(), doc.matches('}').count());
        assert!(doc.starts_with("{\"meta\":{\"date\":\"x\"},\"results\":[\n{"));
    }

    #[test]
    fn ratios_pair_rill_with_peers_of_the_same_group() {
        let mut other_group = outcome("redis", 1.0, Some(1.0));
        other_group.durability = "none".into();
        let outcomes = vec![
            outcome("rill-server", 4000.0, Some(100.0)),
            outcome("redis", 2000.0, Some(400.0)),
            outcome("nats", 100.0, None),
            other_group,
        ];
        let r = ratios(&outcomes);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].peer.as_str(), r[0].throughput, r[0].p99), ("redis", 2.0, 0.25));
        assert_eq!(r[1].peer, "nats");
        assert_eq!(r[1].throughput, 40.0);
        assert!(r[1].p99.is_nan());
        let md = to_markdown(&outcomes);
        assert!(md.contains("| produce | always | closed | rill-server | 4,000 | 0.400 | ack | 0.050 | 0.100 | 0.200 | 0.400 | fsyncs/s 5,000 |"), "{md}");
        assert!(md.contains("| produce | always | closed | rill-server | redis | 2.000 | 0.250 |"), "{md}");
        assert!(md.contains("| produce | always | closed | rill-server | nats | 40.0 | – |"), "{md}");
    }

    #[test]
    fn human_separates_thousands() {
        assert_eq!(human(1_234_567.4), "1,234,567");
        assert_eq!(human(-1234.0), "-1,234");
        assert_eq!(human(999.0), "999.0");
        assert_eq!(human(f64::NAN), "–");
    }

    #[test]
    fn log_axis_spans_whole_decades() {
        let a = LogAxis::covering([150.0, 42_000.0, f64::NAN, 0.0]).unwrap();
        assert_eq!(a.decades(), vec![100.0, 1000.0, 10_000.0, 100_000.0]);
        assert_eq!(a.fraction(100.0), 0.0);
        assert_eq!(a.fraction(100_000.0), 1.0);
        assert!((a.fraction(1000.0) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(a.fraction(-1.0), 0.0);
        assert!(LogAxis::covering([0.0, f64::NAN]).is_none());
        assert_eq!(LogAxis::covering([10.0]).unwrap().decades(), vec![10.0, 100.0]);
    }

    #[test]
    fn svg_has_a_bar_per_figure() {
        let outcomes = vec![outcome("rill-server", 4000.0, Some(100.0)), outcome("redis", 2000.0, None)];
        let svg = to_svg("t <1>", &outcomes);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("<desc>t &lt;1&gt;</desc>"));
        let long = to_svg(&"x".repeat(500), &outcomes);
        assert!(long.contains(&format!("<desc>{}</desc>", "x".repeat(500))));
        assert!(long.contains("x…</text>"));
        // 2 throughput bars + 1 latency bar (redis has none) + 2 legend squares + background.
        assert_eq!(svg.matches("<rect").count(), 6);
        assert!(svg.contains("<title>rill-server produce always closed: p99 0.100 ms</title>"));
    }
}
