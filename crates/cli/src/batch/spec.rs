//! The pipeline spec: stages in order, each a minijinja prompt template over the item's
//! fields and earlier stages' outputs, with an optional `when` condition.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub stages: Vec<Stage>,
    /// Model family (`plain`, `chat`, `thinking`); default: from the model's metadata.
    pub family: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// The field the stage's output is stored under (and later templates read).
    pub name: String,
    /// A minijinja template, e.g. `Refine this caption: {{ caption }}`.
    pub prompt: String,
    /// Send as a chat message (the model's chat template); default: the family's choice.
    pub chat: Option<bool>,
    pub system: Option<String>,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    #[serde(default)]
    pub temperature: f32,
    /// A minijinja expression; the stage runs only when it is true (else its field is null).
    pub when: Option<String>,
    /// Capture activations: `{"hooks": [...], "positions": "last"}`, written per item.
    pub capture: Option<CaptureStage>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureStage {
    pub hooks: Vec<String>,
    #[serde(default = "default_positions")]
    pub positions: String,
}

fn default_max_tokens() -> usize {
    128
}

fn default_positions() -> String {
    "last".into()
}

impl Spec {
    pub fn load(path: &Path) -> Result<Spec> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading the spec {}", path.display()))?;
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let spec: Spec = match ext {
            "json" => serde_json::from_str(&text)?,
            "toml" => toml::from_str(&text)?,
            "yaml" | "yml" => serde_yaml::from_str(&text)?,
            _ => bail!("the spec must be .json, .toml or .yaml, not `{}`", path.display()),
        };
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> Result<()> {
        if self.stages.is_empty() {
            bail!("the spec has no stages");
        }
        // Request keys carry the stage in their low 8 bits.
        if self.stages.len() > 255 {
            bail!("the spec has {} stages; at most 255", self.stages.len());
        }
        let env = environment();
        for (i, s) in self.stages.iter().enumerate() {
            if s.name.is_empty() || matches!(s.name.as_str(), "id" | "error" | "stats" | "captures") {
                bail!("stage {i}: `{}` cannot be a stage name (empty or a reserved key)", s.name);
            }
            if self.stages[..i].iter().any(|o| o.name == s.name) {
                bail!("two stages are named `{}`", s.name);
            }
            env.template_from_str(&s.prompt).with_context(|| format!("stage `{}`: the prompt template does not parse", s.name))?;
            if let Some(w) = &s.when {
                env.compile_expression(w).with_context(|| format!("stage `{}`: `when` does not parse", s.name))?;
            }
        }
        Ok(())
    }
}

/// Templates fail on undefined variables: a missing field is an error, never an empty string.
pub fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env
}

/// The stage's prompt for this context, or why it cannot be rendered.
pub fn render(env: &minijinja::Environment, stage: &Stage, ctx: &Map<String, Value>) -> Result<String, String> {
    env.render_str(&stage.prompt, ctx).map_err(|e| format!("the prompt template: {e}"))
}

/// Does the stage run for this context?
pub fn runs(env: &minijinja::Environment, stage: &Stage, ctx: &Map<String, Value>) -> Result<bool, String> {
    let Some(w) = &stage.when else { return Ok(true) };
    let expr = env.compile_expression(w).map_err(|e| format!("`when`: {e}"))?;
    expr.eval(ctx).map(|v| v.is_true()).map_err(|e| format!("`when`: {e}"))
}
