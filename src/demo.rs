//! `tandem demo`.
use std::time::Duration;

pub struct Options {
    pub duration: Duration,
    pub keep_running: bool,
}

pub async fn run(_options: Options) -> anyhow::Result<()> {
    anyhow::bail!("demo is not built yet")
}
