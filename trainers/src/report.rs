//! What a training run leaves behind: a progress bar while it runs, every
//! metric as one JSON object per line (`metrics.jsonl`), an SVG plot of the
//! curves, and the one-line JSON summary the examples print last:
//!
//! ```text
//! {"example": NAME, "metric": NAME, "start": X, "end": Y, "steps": N, "seconds": S}
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use serde_json::{json, Map, Value};

use crate::TrainError;

/// A run's metrics log, progress bar and plots (see the [module docs](self)).
#[derive(Debug)]
pub struct RunLog {
    example: String,
    dir: PathBuf,
    jsonl: BufWriter<File>,
    series: BTreeMap<String, Vec<(f64, f64)>>,
    bar: ProgressBar,
    started: Instant,
}

impl RunLog {
    /// Creates `dir` (and `dir/metrics.jsonl`, appended to when resuming) and
    /// a progress bar of `total` steps (hidden when stderr is not a terminal).
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] if the directory or file cannot be created.
    pub fn new(example: &str, dir: impl AsRef<Path>, total: u64) -> Result<Self, TrainError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("metrics.jsonl"))?;
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .map_err(|e| TrainError::Io(e.to_string()))?,
        );
        Ok(RunLog {
            example: example.to_string(),
            dir,
            jsonl: BufWriter::new(file),
            series: BTreeMap::new(),
            bar,
            started: Instant::now(),
        })
    }

    /// The progress bar (set its prefix per phase, its message per step).
    pub fn bar(&self) -> &ProgressBar {
        &self.bar
    }

    /// The run's output directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts a phase: resets the bar to `total` steps under `name`.
    pub fn phase(&self, name: &str, total: u64) {
        self.bar.set_prefix(name.to_string());
        self.bar.set_length(total);
        self.bar.set_position(0);
    }

    /// Records `metrics` of `phase` at `step`: one JSONL line, and a point
    /// of each curve `phase/name`.
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] if the line cannot be written.
    pub fn log(
        &mut self,
        phase: &str,
        step: usize,
        metrics: &[(&str, f64)],
    ) -> Result<(), TrainError> {
        let mut m = Map::new();
        m.insert("phase".into(), json!(phase));
        m.insert("step".into(), json!(step));
        for (k, v) in metrics {
            m.insert(
                (*k).to_string(),
                if v.is_finite() { json!(v) } else { Value::Null },
            );
            self.series
                .entry(format!("{phase}/{k}"))
                .or_default()
                .push((step as f64, *v));
        }
        writeln!(self.jsonl, "{}", Value::Object(m))?;
        self.jsonl.flush()?;
        Ok(())
    }

    /// Draws the named curves (`phase/metric`), one panel each, into
    /// `file` under the run directory; returns its path. Curves that were
    /// never logged (a phase that did not run) are left out.
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] if drawing fails; [`TrainError::Config`] when none
    /// of the curves was logged.
    pub fn plot(&self, file: &str, curves: &[&str]) -> Result<PathBuf, TrainError> {
        let curves: Vec<&str> = curves
            .iter()
            .copied()
            .filter(|c| self.series.contains_key(*c))
            .collect();
        if curves.is_empty() {
            return Err(TrainError::config(format!(
                "plot {file}: none of the curves was logged"
            )));
        }
        let path = self.dir.join(file);
        let cols = curves.len().clamp(1, 3);
        let rows = curves.len().div_ceil(cols).max(1);
        let io =
            |e: &dyn std::fmt::Display| TrainError::Io(format!("plotting {}: {e}", path.display()));
        {
            let root =
                SVGBackend::new(&path, (420 * cols as u32, 300 * rows as u32)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| io(&e))?;
            let panels = root.split_evenly((rows, cols));
            for (name, area) in curves.iter().zip(panels.iter()) {
                let pts: Vec<(f64, f64)> = self
                    .series
                    .get(*name)
                    .ok_or_else(|| TrainError::config(format!("no curve {name:?} was logged")))?
                    .iter()
                    .copied()
                    .filter(|p| p.1.is_finite())
                    .collect();
                let (x0, x1) = pts
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
                let (y0, y1) = pts
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
                let (x0, x1) = if pts.is_empty() {
                    (0.0, 1.0)
                } else {
                    (x0, x1.max(x0 + 1.0))
                };
                let pad = ((y1 - y0).abs() * 0.05).max(1e-6);
                let (y0, y1) = if pts.is_empty() {
                    (0.0, 1.0)
                } else {
                    (y0 - pad, y1 + pad)
                };
                let mut chart = ChartBuilder::on(area)
                    .caption(*name, ("sans-serif", 16))
                    .margin(8)
                    .x_label_area_size(28)
                    .y_label_area_size(48)
                    .build_cartesian_2d(x0..x1, y0..y1)
                    .map_err(|e| io(&e))?;
                chart
                    .configure_mesh()
                    .x_desc("step")
                    .draw()
                    .map_err(|e| io(&e))?;
                chart
                    .draw_series(LineSeries::new(pts, &BLUE))
                    .map_err(|e| io(&e))?;
            }
            root.present().map_err(|e| io(&e))?;
        }
        Ok(path)
    }

    /// Seconds since the log was created.
    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Ends the run: clears the bar and returns the summary line
    /// `{"example", "metric", "start", "end", "steps", "seconds"}` (the
    /// examples print it as their last line).
    pub fn finish(&mut self, metric: &str, start: f64, end: f64, steps: usize) -> String {
        self.bar.finish_and_clear();
        let _ = self.jsonl.flush();
        json!({
            "example": self.example,
            "metric": metric,
            "start": start,
            "end": end,
            "steps": steps,
            "seconds": (self.seconds() * 10.0).round() / 10.0,
        })
        .to_string()
    }
}

/// The examples' command line: `--name value` pairs and `--flag`s.
#[derive(Debug, Clone)]
pub struct Args(Vec<String>);

impl Args {
    /// The process's arguments.
    pub fn from_env() -> Self {
        Args(std::env::args().skip(1).collect())
    }

    /// From explicit arguments.
    pub fn from_vec(v: Vec<String>) -> Self {
        Args(v)
    }

    /// The value after `--name`, parsed, or `default`.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for a missing or unparsable value.
    pub fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, TrainError> {
        let key = format!("--{name}");
        match self.0.iter().position(|a| *a == key) {
            None => Ok(default),
            Some(i) => {
                let v = self
                    .0
                    .get(i + 1)
                    .ok_or_else(|| TrainError::config(format!("{key} needs a value")))?;
                v.parse()
                    .map_err(|_| TrainError::config(format!("{key} {v}: not a valid value")))
            }
        }
    }

    /// Whether `--name` was given.
    pub fn has(&self, name: &str) -> bool {
        self.0.contains(&format!("--{name}"))
    }
}
