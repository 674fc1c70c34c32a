//! A study file: a base recipe, named variants (overrides, as `--set` takes them) and seeds.
//!
//! ```toml
//! [study]
//! name = "table1-rep"
//! base = "../imagenette_cpu.toml"   # relative to this file; omitted: the built-in recipe
//! seeds = [0, 1, 2]
//! baseline = "n3"                   # the variant the others are compared with (default: first)
//! sets = ["train.epochs=10"]        # applied to every run, before each variant's own
//!
//! [[variant]]
//! name = "n3"
//! label = "N=3 + 1x1 DW"            # the table's row name (default: name)
//! sets = ["model.rep_branches=3"]
//! paper = 77.6                      # the paper's ImageNet top-1 for the row, if it has one
//! ```

use crate::train::config::TrainConfig;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudySection {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The base recipe, relative to the study file (None: `ghostv3 train`'s built-in recipe).
    #[serde(default)]
    pub base: Option<String>,
    pub seeds: Vec<u64>,
    #[serde(default)]
    pub baseline: Option<String>,
    #[serde(default)]
    pub sets: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub sets: Vec<String>,
    /// The paper's figure for this row (ImageNet top-1, %), shown beside ours.
    #[serde(default)]
    pub paper: Option<f64>,
}

impl Variant {
    pub fn label(&self) -> &str {
        self.label.as_deref().unwrap_or(&self.name)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyFile {
    pub study: StudySection,
    #[serde(rename = "variant")]
    pub variants: Vec<Variant>,
}

/// Everything a study is made of, stored as `study.json` in its directory so that it resumes
/// (and reports) without the original files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    /// The study file's text.
    pub study_text: String,
    /// The base recipe's text (the built-in recipe when the study names none).
    pub base_text: String,
    /// Where the base came from, for messages.
    pub base_origin: String,
    /// `--set`s given to `ghostv3 study`: applied to every run after the study's own.
    pub cli_sets: Vec<String>,
}

/// One (variant, seed) of a study.
#[derive(Clone, Debug)]
pub struct PlannedRun {
    pub variant: usize,
    pub seed: u64,
    /// Relative to the study directory: `<variant>/seed-<seed>`.
    pub rel_dir: String,
    pub cfg: TrainConfig,
}

fn check_name(what: &str, name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            && !name.starts_with('.'),
        "{what} {name:?}: use 1-64 letters, digits, '_', '-' or '.' (it names a directory)"
    );
    Ok(())
}

impl Resolved {
    /// Reads a study file and its base recipe.
    pub fn load(path: &Path, cli_sets: &[String]) -> Result<Self> {
        let study_text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the study file {}", path.display()))?;
        let file = parse(&study_text, &path.display().to_string())?;
        let (base_text, base_origin) = match &file.study.base {
            Some(b) => {
                let p = path.parent().unwrap_or(Path::new(".")).join(b);
                let text = std::fs::read_to_string(&p).with_context(|| {
                    format!(
                        "{}: cannot read its base recipe {} (study.base is relative to the study file)",
                        path.display(),
                        p.display()
                    )
                })?;
                (text, p.display().to_string())
            }
            None => (
                TrainConfig::default_recipe().to_string(),
                "built-in recipe".to_string(),
            ),
        };
        let r = Resolved {
            study_text,
            base_text,
            base_origin,
            cli_sets: cli_sets.to_vec(),
        };
        r.plan()?;
        Ok(r)
    }

    pub fn file(&self) -> Result<StudyFile> {
        parse(&self.study_text, "study.json")
    }

    /// Every run of the study, its recipe resolved and checked: variant-major, seeds inner.
    pub fn plan(&self) -> Result<Vec<PlannedRun>> {
        let f = self.file()?;
        let mut runs = Vec::new();
        for (vi, v) in f.variants.iter().enumerate() {
            for &seed in &f.study.seeds {
                let mut sets = f.study.sets.clone();
                sets.extend(v.sets.iter().cloned());
                sets.extend(self.cli_sets.iter().cloned());
                sets.push(format!("train.seed={seed}"));
                let origin = format!("{} + variant {:?}", self.base_origin, v.name);
                let cfg = TrainConfig::from_toml(&self.base_text, &sets, &origin)
                    .with_context(|| format!("study {:?}, variant {:?}", f.study.name, v.name))?;
                runs.push(PlannedRun {
                    variant: vi,
                    seed,
                    rel_dir: format!("{}/seed-{seed}", v.name),
                    cfg,
                });
            }
        }
        Ok(runs)
    }
}

pub fn parse(text: &str, origin: &str) -> Result<StudyFile> {
    let f: StudyFile =
        toml::from_str(text).with_context(|| format!("{origin}: not a study file"))?;
    check_name("study.name", &f.study.name)?;
    ensure!(!f.study.seeds.is_empty(), "{origin}: study.seeds is empty");
    let seeds: BTreeSet<u64> = f.study.seeds.iter().copied().collect();
    ensure!(
        seeds.len() == f.study.seeds.len(),
        "{origin}: study.seeds repeats a seed"
    );
    ensure!(!f.variants.is_empty(), "{origin}: no [[variant]]");
    let mut names = BTreeSet::new();
    for v in &f.variants {
        check_name("variant", &v.name)?;
        if !names.insert(v.name.as_str()) {
            bail!("{origin}: variant {:?} appears twice", v.name);
        }
        if let Some(p) = v.paper {
            ensure!(
                (0.0..=100.0).contains(&p),
                "{origin}: variant {:?}: paper = {p} is not a top-1 in %",
                v.name
            );
        }
    }
    if let Some(b) = &f.study.baseline {
        ensure!(
            names.contains(b.as_str()),
            "{origin}: study.baseline = {b:?} is not a variant (variants: {})",
            names.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(f)
}

impl StudyFile {
    /// The index of the variant the others are compared with.
    pub fn baseline(&self) -> usize {
        self.study
            .baseline
            .as_ref()
            .and_then(|b| self.variants.iter().position(|v| &v.name == b))
            .unwrap_or(0)
    }
}
