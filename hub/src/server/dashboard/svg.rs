//! Charts drawn on the server as inline SVG: a stacked progress bar, a paired histogram and a line
//! chart. No script draws anything in the browser; each mark carries a `<title>` for its figure on
//! hover. Colours come from CSS classes in `style.css`, so the charts follow the page's palette.

use std::fmt::Write;

use super::Esc;

/// One part of a stacked bar: its count, CSS class and name.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub count: u64,
    pub class: &'a str,
    pub name: &'a str,
}

/// A horizontal bar, 100% wide, split in proportion to `segments` out of `total`.
pub fn stacked_bar(segments: &[Segment<'_>], total: u64) -> String {
    let mut svg = String::from(
        "<svg class=\"bar\" viewBox=\"0 0 1000 14\" preserveAspectRatio=\"none\" role=\"img\">\
         <rect class=\"bar-bg\" x=\"0\" y=\"0\" width=\"1000\" height=\"14\" rx=\"3\"/>",
    );
    if total > 0 {
        let mut x = 0.0;
        for segment in segments.iter().filter(|segment| segment.count > 0) {
            let width = 1000.0 * segment.count as f64 / total as f64;
            let _ = write!(
                svg,
                "<rect class=\"{}\" x=\"{x:.1}\" y=\"0\" width=\"{width:.1}\" height=\"14\">\
                 <title>{} {}</title></rect>",
                segment.class,
                segment.count,
                Esc(segment.name)
            );
            x += width;
        }
    }
    svg.push_str("</svg>");
    svg
}

const HIST_W: f64 = 520.0;
const HIST_H: f64 = 150.0;
const HIST_PAD: f64 = 22.0;

/// Reference and current histograms side by side, as proportions of each one's total, over the
/// same bins; `labels` names each bin (for hover).
pub fn histogram(reference: &[u64], current: &[u64], labels: &[String]) -> String {
    let bins = reference.len().max(current.len()).max(1);
    let share = |counts: &[u64]| -> Vec<f64> {
        let total: u64 = counts.iter().sum();
        counts
            .iter()
            .map(|count| {
                if total == 0 {
                    0.0
                } else {
                    *count as f64 / total as f64
                }
            })
            .collect()
    };
    let (reference, current) = (share(reference), share(current));
    let top = reference
        .iter()
        .chain(&current)
        .copied()
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let plot_h = HIST_H - HIST_PAD;
    let slot = HIST_W / bins as f64;
    let bar = (slot * 0.42).max(0.5);
    let mut svg = format!(
        "<svg class=\"hist\" viewBox=\"0 0 {HIST_W} {HIST_H}\" role=\"img\">\
         <line class=\"axis\" x1=\"0\" y1=\"{plot_h}\" x2=\"{HIST_W}\" y2=\"{plot_h}\"/>"
    );
    for bin in 0..bins {
        let label = labels.get(bin).map_or("", String::as_str);
        for (side, shares, class) in [(0.0, &reference, "ref"), (1.0, &current, "cur")] {
            let value = shares.get(bin).copied().unwrap_or(0.0);
            let height = plot_h * value / top;
            let x = slot * bin as f64 + slot * 0.08 + side * bar;
            let _ = write!(
                svg,
                "<rect class=\"{class}\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" \
                 height=\"{height:.1}\"><title>{} {}: {:.1}%</title></rect>",
                plot_h - height,
                if class == "ref" {
                    "reference"
                } else {
                    "current"
                },
                Esc(label),
                value * 100.0
            );
        }
    }
    let _ = write!(
        svg,
        "<text x=\"0\" y=\"{}\" class=\"tick\">{}</text>\
         <text x=\"{HIST_W}\" y=\"{}\" class=\"tick end\">{}</text></svg>",
        HIST_H - 6.0,
        Esc(labels.first().map_or("", String::as_str)),
        HIST_H - 6.0,
        Esc(labels.last().map_or("", String::as_str)),
    );
    svg
}

const LINE_W: f64 = 520.0;
const LINE_H: f64 = 150.0;
const LINE_LEFT: f64 = 44.0;
const LINE_BOTTOM: f64 = 22.0;

/// A line over `points` (x a Unix time, y a value), with `threshold` drawn as a dashed line;
/// `x_label` formats the first and last x for the axis.
pub fn line_chart(
    points: &[(u64, f64)],
    threshold: f64,
    x_label: impl Fn(u64) -> String,
) -> String {
    let plot_w = LINE_W - LINE_LEFT;
    let plot_h = LINE_H - LINE_BOTTOM;
    let mut svg = format!(
        "<svg class=\"line\" viewBox=\"0 0 {LINE_W} {LINE_H}\" role=\"img\">\
         <line class=\"axis\" x1=\"{LINE_LEFT}\" y1=\"{plot_h}\" x2=\"{LINE_W}\" y2=\"{plot_h}\"/>\
         <line class=\"axis\" x1=\"{LINE_LEFT}\" y1=\"0\" x2=\"{LINE_LEFT}\" y2=\"{plot_h}\"/>"
    );
    let finite = |value: f64| if value.is_finite() { value } else { 0.0 };
    let top = points
        .iter()
        .map(|(_, value)| finite(*value))
        .fold(threshold, f64::max)
        .max(1e-9)
        * 1.1;
    let (first, last) = match (points.first(), points.last()) {
        (Some(first), Some(last)) => (first.0, last.0),
        _ => (0, 0),
    };
    let span = last.saturating_sub(first).max(1) as f64;
    let x_of = |at: u64| LINE_LEFT + plot_w * at.saturating_sub(first) as f64 / span;
    let y_of = |value: f64| plot_h - plot_h * finite(value) / top;
    let limit_y = y_of(threshold);
    let _ = write!(
        svg,
        "<line class=\"limit\" x1=\"{LINE_LEFT}\" y1=\"{limit_y:.1}\" x2=\"{LINE_W}\" y2=\"{limit_y:.1}\">\
         <title>threshold {threshold:.3}</title></line>\
         <text x=\"{}\" y=\"{:.1}\" class=\"tick end\">{threshold:.2}</text>",
        LINE_LEFT - 4.0,
        limit_y + 4.0,
    );
    // The scale's top, unless it would print over the threshold's label.
    if limit_y > 24.0 {
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"10\" class=\"tick end\">{top:.2}</text>",
            LINE_LEFT - 4.0
        );
    }
    if points.len() > 1 {
        svg.push_str("<polyline class=\"series\" points=\"");
        for (at, value) in points {
            let _ = write!(svg, "{:.1},{:.1} ", x_of(*at), y_of(*value));
        }
        svg.push_str("\"/>");
    }
    for (at, value) in points {
        let _ = write!(
            svg,
            "<circle class=\"dot\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\"><title>{}: {value:.4}</title></circle>",
            x_of(*at),
            y_of(*value),
            Esc(&x_label(*at))
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{LINE_LEFT}\" y=\"{}\" class=\"tick\">{}</text>\
         <text x=\"{LINE_W}\" y=\"{}\" class=\"tick end\">{}</text></svg>",
        LINE_H - 6.0,
        Esc(&x_label(first)),
        LINE_H - 6.0,
        Esc(&x_label(last)),
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_text_in_charts() {
        let labels = vec!["<b>".to_owned(), "\"x\"".to_owned()];
        let svg = histogram(&[1, 2], &[2, 1], &labels);
        assert!(!svg.contains("<b>") && svg.contains("&lt;b&gt;"), "{svg}");
        let line = line_chart(&[(0, 0.1), (3600, 0.3)], 0.2, |_| "<t>".to_owned());
        assert!(
            !line.contains("<t>") && line.contains("&lt;t&gt;"),
            "{line}"
        );
    }

    #[test]
    fn empty_inputs_draw_without_dividing_by_zero() {
        let bar = stacked_bar(&[], 0);
        assert!(bar.starts_with("<svg") && !bar.contains("NaN"));
        let hist = histogram(&[0, 0], &[], &[]);
        assert!(!hist.contains("NaN"), "{hist}");
        let line = line_chart(&[], 0.1, |at| at.to_string());
        assert!(!line.contains("NaN"), "{line}");
    }
}
