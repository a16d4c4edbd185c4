//! The OpenAI-compatible server (issue: `glassbox serve`).
use clap::Args;

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long)]
    pub model: Option<String>,
}

pub fn serve(_a: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("`glassbox serve` is not built yet")
}
