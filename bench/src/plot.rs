//! The latency CDF as an SVG: one line per run, latency on a log axis, share of deliveries up.
//! Hand-written SVG (a few dozen lines) instead of a plotting crate's build time.

use std::fmt::Write;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
/// Courtside's lines in warm colours, everyone else's in cool ones, so a pair reads at a glance.
const WARM: [&str; 5] = ["#d62728", "#ff7f0e", "#8c564b", "#e377c2", "#bcbd22"];
const COOL: [&str; 5] = ["#1f77b4", "#17becf", "#2ca02c", "#9467bd", "#7f7f7f"];

/// One line of the plot: a label and CDF points (ms, fraction).
pub struct Series<'a> {
    pub label: String,
    pub points: &'a [(f64, f64)],
}

/// The SVG text of a CDF plot of `series`.
pub fn cdf_svg(title: &str, series: &[Series<'_>]) -> String {
    let all = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let max = all.clone().fold(1.0_f64, f64::max);
    let min = all.filter(|v| *v > 0.0).fold(max, f64::min).max(0.01);
    let (lo, hi) = (min.log10().floor(), max.log10().ceil().max(min.log10().floor() + 1.0));
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |ms: f64| LEFT + (ms.max(10f64.powf(lo)).log10() - lo) / (hi - lo) * plot_w;
    let y = |q: f64| TOP + (1.0 - q) * plot_h;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="22" font-size="14">{}</text>"#,
        escape(title)
    );
    for decade in lo as i32..=hi as i32 {
        let ms = 10f64.powi(decade);
        let px = x(ms);
        let _ = write!(
            svg,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#ddd"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 16.0,
            if ms < 1.0 { format!("{ms}") } else { format!("{ms:.0}") }
        );
    }
    for q in [0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0] {
        let py = y(q);
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{q}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            py + 4.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">latency, publish to receipt (ms, log scale)</text><text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">share of deliveries</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 12.0,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    let (mut warm, mut cool) = (0, 0);
    for (i, s) in series.iter().enumerate() {
        let color = if s.label.starts_with("courtside") {
            warm += 1;
            WARM[(warm - 1) % WARM.len()]
        } else {
            cool += 1;
            COOL[(cool - 1) % COOL.len()]
        };
        let points: Vec<String> = s
            .points
            .iter()
            .map(|(ms, q)| format!("{:.1},{:.1}", x(*ms), y(*q)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/><rect x="{:.1}" y="{:.1}" width="14" height="3" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            points.join(" "),
            LEFT + plot_w + 12.0,
            TOP + 10.0 + 18.0 * i as f64,
            LEFT + plot_w + 30.0,
            TOP + 15.0 + 18.0 * i as f64,
            escape(&s.label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_one_line_per_series_with_its_label() {
        let a = [(1.0, 0.0), (5.0, 0.5), (40.0, 1.0)];
        let b = [(2.0, 0.0), (9.0, 0.5), (300.0, 1.0)];
        let svg = cdf_svg(
            "fanout <1000>",
            &[
                Series {
                    label: "courtside".into(),
                    points: &a,
                },
                Series {
                    label: "socket.io".into(),
                    points: &b,
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">courtside<") && svg.contains(">socket.io<"));
        assert!(svg.contains("fanout &lt;1000&gt;"));
        // The axis spans whole decades around the data, 1 ms at its left edge, 1000 ms at its right.
        assert!(
            svg.contains(r#"<text x="70.0" y="406.0" text-anchor="middle">1</text>"#),
            "{svg}"
        );
        assert!(
            svg.contains(r#"<text x="560.0" y="406.0" text-anchor="middle">1000</text>"#),
            "{svg}"
        );
        // Courtside in a warm colour, the other server in a cool one.
        assert!(svg.contains(r##"stroke="#d62728""##) && svg.contains(r##"stroke="#1f77b4""##));
    }
}
