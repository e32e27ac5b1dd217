//! `hop-plot RESULT.json...`: a PNG beside each result of the remote harness
//! (`benchmarks/harness/remote.py`): wall time (median, min-max whiskers) and bytes on the wire
//! for every tool, fresh copy and delta, and the delta's physical limit when the run has one.
//! Tuning sessions (tools `hop:VARIANT`) plot the same way: time per setting. The paper
//! experiment's result (`benchmarks/harness/paper_experiment.py`, with `scenarios`) plots its
//! downtime and longest client request per load, hop's next to the paper's.

use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A font for the labels (plotters draws text with ab_glyph from a font file we give it).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// One bar: its label, the median, and the range of the runs.
struct Bar {
    label: String,
    value: f64,
    range: Option<(f64, f64)>,
    hop: bool,
}

fn bars(result: &Value, metric: &str) -> Vec<Bar> {
    let mut out = Vec::new();
    let Some(tools) = result.as_object() else {
        return out;
    };
    for phase in ["fresh", "delta"] {
        for (tool, phases) in tools {
            if tool.starts_with('_') {
                continue;
            }
            let Some(p) = phases.get(phase) else { continue };
            let get = |k: &str| p.get(k).and_then(Value::as_f64);
            let (value, range) = match metric {
                "s" => match get("s_median") {
                    Some(v) => (v, get("s_min").zip(get("s_max"))),
                    None => continue,
                },
                _ => match get("wire_median") {
                    Some(v) => (v / 1e6, None),
                    None => continue,
                },
            };
            out.push(Bar {
                label: format!("{phase}: {tool}"),
                value,
                range,
                hop: tool.starts_with("hop"),
            });
        }
    }
    out
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    unit: &str,
    bars: &[Bar],
    limit: Option<f64>,
) -> Result<(), Box<dyn std::error::Error>> {
    let max = bars
        .iter()
        .map(|b| b.range.map(|r| r.1).unwrap_or(b.value))
        .chain(limit)
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.6;
    let n = bars.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(10)
        .build_cartesian_2d(0f64..max, 0f64..n as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc(unit)
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, b) in bars.iter().enumerate() {
        let y0 = n as f64 - i as f64 - 0.85;
        let y1 = n as f64 - i as f64 - 0.15;
        let color = if b.hop {
            RGBColor(31, 119, 180)
        } else {
            RGBColor(200, 120, 40)
        };
        chart.draw_series(std::iter::once(Rectangle::new(
            [(0.0, y0), (b.value, y1)],
            color.filled(),
        )))?;
        if let Some((lo, hi)) = b.range {
            let y = (y0 + y1) / 2.0;
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(lo, y), (hi, y)],
                BLACK.stroke_width(2),
            )))?;
        }
        chart.draw_series(std::iter::once(Text::new(
            format!("{}  {:.2}", b.label, b.value),
            (
                b.range.map(|r| r.1).unwrap_or(b.value) + max * 0.01,
                y1 - 0.05,
            ),
            ("sans-serif", 13),
        )))?;
    }
    if let Some(l) = limit {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(l, 0.0), (l, n as f64)],
                RED.stroke_width(2),
            )))?
            .label(format!("physical limit of the delta {l:.2} {unit}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()?;
    }
    Ok(())
}

/// The paper experiment's bars: per load, hop's median (min-max of its runs) and the paper's.
fn paper_bars(result: &Value, what: &str) -> Vec<Bar> {
    let mut out = Vec::new();
    let Some(scenarios) = result.get("scenarios").and_then(Value::as_object) else {
        return out;
    };
    let mut loads: Vec<(u64, &Value)> = scenarios
        .iter()
        .filter_map(|(k, v)| Some((k.parse().ok()?, v)))
        .collect();
    loads.sort_by_key(|(c, _)| *c);
    let runs = result.get("runs").and_then(Value::as_array);
    for (clients, sc) in loads {
        let ours: Vec<f64> = runs
            .into_iter()
            .flatten()
            .filter(|r| r.get("clients").and_then(Value::as_u64) == Some(clients))
            .filter(|r| r.get("rolled_back").and_then(Value::as_bool) != Some(true))
            .filter_map(|r| {
                let members = r.get("timeline")?.as_array()?;
                let worst = members
                    .iter()
                    .filter_map(|m| m.get("downtime_ms").and_then(Value::as_f64))
                    .fold(0.0, f64::max);
                Some(worst / 1e3)
            })
            .collect();
        let range = ours
            .iter()
            .copied()
            .fold(None, |acc: Option<(f64, f64)>, v| match acc {
                None => Some((v, v)),
                Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
            });
        let (value, paper) = match what {
            "downtime" => (
                sc.pointer("/median_s/downtime").and_then(Value::as_f64),
                sc.get("paper_downtime_s").and_then(Value::as_f64),
            ),
            _ => (sc.get("longest_s").and_then(Value::as_f64), None),
        };
        if let Some(v) = value {
            out.push(Bar {
                label: format!("{clients} clients: hop"),
                value: v,
                range: if what == "downtime" { range } else { None },
                hop: true,
            });
        }
        if let Some(p) = paper {
            out.push(Bar {
                label: format!("{clients} clients: paper"),
                value: p,
                range: None,
                hop: false,
            });
        }
    }
    out
}

fn plot_paper(json: &Path, result: &Value) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let out = json.with_extension("png");
    let down = paper_bars(result, "downtime");
    let longest = paper_bars(result, "longest");
    let height = 140 + 30 * down.len() as u32;
    {
        let root = BitMapBackend::new(&out, (1500, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(
            "WordPress + MariaDB moved under load (the paper's Table III)",
            ("sans-serif", 26),
        )?;
        let (left, right) = root.split_horizontally(750);
        panel(
            &left,
            "downtime (hop: median, min-max)",
            "seconds",
            &down,
            None,
        )?;
        panel(
            &right,
            "longest client request (hop)",
            "seconds",
            &longest,
            None,
        )?;
        root.present()?;
    }
    Ok(out)
}

fn plot(json: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let result: Value = serde_json::from_str(&std::fs::read_to_string(json)?)?;
    if result.get("scenarios").is_some() {
        return plot_paper(json, &result);
    }
    let out = json.with_extension("png");
    let name = json
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let time = bars(&result, "s");
    let wire = bars(&result, "wire");
    if time.is_empty() {
        return Err(format!("{}: no tool results", json.display()).into());
    }
    let height = 140 + 30 * time.len() as u32;
    let limit = result.pointer("/_limit/s").and_then(Value::as_f64);
    {
        let root = BitMapBackend::new(&out, (1500, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(&name, ("sans-serif", 26))?;
        let (left, right) = root.split_horizontally(750);
        panel(
            &left,
            "wall time (median, min-max)",
            "seconds",
            &time,
            limit,
        )?;
        panel(
            &right,
            "bytes on the wire (veth counters)",
            "MB",
            &wire,
            None,
        )?;
        root.present()?;
    }
    Ok(out)
}

fn main() {
    let font = FONTS.iter().find_map(|p| std::fs::read(p).ok());
    let Some(font) = font else {
        eprintln!("hop-plot: no font found (apt-get install fonts-dejavu-core)");
        std::process::exit(2);
    };
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    if plotters::style::register_font("sans-serif", FontStyle::Normal, font).is_err() {
        eprintln!("hop-plot: the font could not be read");
        std::process::exit(2);
    }
    let files: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if files.is_empty() {
        eprintln!("usage: hop-plot RESULT.json...  (writes RESULT.png beside each)");
        std::process::exit(2);
    }
    let mut failed = false;
    for f in &files {
        match plot(f) {
            Ok(png) => println!("{}", png.display()),
            Err(e) => {
                eprintln!("hop-plot: {}: {e}", f.display());
                failed = true;
            }
        }
    }
    std::process::exit(i32::from(failed));
}
