//! The five figures as a table or as JSON.

use serde::Serialize;

/// Which way a target bounds its ratio.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum Bound {
    #[serde(rename = ">=")]
    AtLeast,
    #[serde(rename = "<=")]
    AtMost,
}

/// What a figure's ratio must reach.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Target {
    pub bound: Bound,
    pub value: f64,
}

impl Target {
    fn met(&self, ratio: f64) -> bool {
        match self.bound {
            Bound::AtLeast => ratio >= self.value,
            Bound::AtMost => ratio <= self.value,
        }
    }

    fn display(&self) -> String {
        let op = match self.bound {
            Bound::AtLeast => "≥",
            Bound::AtMost => "≤",
        };
        format!("{op} {:.2}×", self.value)
    }
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// 1 to 5, as in `--only`.
    pub number: u8,
    pub name: &'static str,
    pub unit: &'static str,
    pub ours: Option<f64>,
    pub llama_cpp: Option<f64>,
    /// What [`Figure::ratio`] divides.
    pub ratio_of: &'static str,
    pub ratio: Option<f64>,
    pub target: Target,
    /// `None` when the ratio could not be measured.
    pub met: Option<bool>,
    /// Raw measurements and how they were taken.
    pub notes: Vec<String>,
    /// Why a side is missing, when one is.
    pub errors: Vec<String>,
}

impl Figure {
    /// A row whose numbers are filled in later.
    pub fn new(number: u8, name: &'static str, unit: &'static str, ratio_of: &'static str, target: Target) -> Self {
        Self {
            number,
            name,
            unit,
            ours: None,
            llama_cpp: None,
            ratio_of,
            ratio: None,
            target,
            met: None,
            notes: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Sets the ratio the target applies to, and whether it is met.
    pub fn set_ratio(&mut self, ratio: f64) {
        if ratio.is_finite() {
            self.ratio = Some(ratio);
            self.met = Some(self.target.met(ratio));
        }
    }

    /// For figures whose ratio is ours / llama.cpp's.
    pub fn set_ratio_vs_llama(&mut self) {
        if let (Some(ours), Some(theirs)) = (self.ours, self.llama_cpp) {
            self.set_ratio(ours / theirs);
        }
    }
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub threads: usize,
    /// `/proc/loadavg`'s 1-minute figure when the run started and when it ended: other load on
    /// the machine makes every figure noisy, llama.cpp's spinning thread pool most of all.
    pub load_average: [Option<f64>; 2],
    /// Why llama.cpp's side is missing, when it is.
    pub llama_cpp_missing: Option<String>,
    pub figures: Vec<Figure>,
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "n/a".to_string(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.3}"),
    }
}

impl Report {
    /// The table for a terminal.
    pub fn table(&self) -> String {
        let load = self.load_average.map(|l| l.map_or("?".to_string(), |l| format!("{l:.2}")));
        let mut out = format!(
            "pdserve-bench: {} on {} threads (load average {} at start, {} at end)\n\n",
            self.model, self.threads, load[0], load[1]
        );
        let header = ["#", "figure", "unit", "ours", "llama.cpp", "ratio", "target", "met"];
        let mut rows: Vec<[String; 8]> = vec![header.map(String::from)];
        for f in &self.figures {
            rows.push([
                f.number.to_string(),
                f.name.to_string(),
                f.unit.to_string(),
                num(f.ours),
                num(f.llama_cpp),
                f.ratio.map_or("n/a".to_string(), |r| format!("{r:.3}×")),
                f.target.display(),
                match f.met {
                    Some(true) => "yes".to_string(),
                    Some(false) => "no".to_string(),
                    None => "n/a".to_string(),
                },
            ]);
        }
        let widths: Vec<usize> = (0..8).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
        for row in &rows {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (cell, w))| {
                    let pad = w - cell.chars().count();
                    // Text columns left-aligned, numbers right-aligned.
                    if c <= 2 {
                        format!("{cell}{}", " ".repeat(pad))
                    } else {
                        format!("{}{cell}", " ".repeat(pad))
                    }
                })
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out.push('\n');
        for f in &self.figures {
            out.push_str(&format!("{}. ratio = {}\n", f.number, f.ratio_of));
            for note in &f.notes {
                out.push_str(&format!("   {note}\n"));
            }
            for error in &f.errors {
                out.push_str(&format!("   error: {error}\n"));
            }
        }
        if let Some(why) = &self.llama_cpp_missing {
            out.push_str(&format!("\nllama.cpp: {why}\n"));
        }
        out
    }
}
