//! Typed hook-point names (`blocks.3.attn.hook_q`), parsed once at admission.
//!
//! Model code never builds or parses strings: it names a site with [`HookName`], whose
//! [`HookName::index`] is plain arithmetic, and asks a bitset whether anyone wants it.

use std::fmt;
use std::str::FromStr;

/// A place in the forward pass. Global sites have no layer; the rest live in `blocks.{i}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    Embed,
    /// Learned absolute position embeddings (GPT-2), added to `hook_embed`.
    PosEmbed,
    ResidPre,
    Ln1,
    Q,
    K,
    V,
    /// After the per-head q norm (Qwen3, Gemma 3).
    QNormed,
    /// After the per-head k norm (Qwen3, Gemma 3).
    KNormed,
    RotQ,
    RotK,
    Pattern,
    Z,
    /// Gemma's post-attention norm (sandwich norm) output.
    Ln1Post,
    AttnOut,
    ResidMid,
    Ln2,
    /// Mixture of experts: the router's logits, `[T, E]`.
    RouterLogits,
    /// Mixture of experts: the experts each token uses, best first, `[T, k]` (ids as floats).
    ExpertIds,
    /// Mixture of experts: the weight of each chosen expert in the token's output, `[T, k]`.
    ExpertWeights,
    MlpPre,
    MlpPreLinear,
    MlpPost,
    /// Gemma's post-MLP norm (sandwich norm) output.
    Ln2Post,
    MlpOut,
    ResidPost,
    LnFinal,
    Logits,
}

impl Site {
    /// Every site in forward-pass order.
    pub const ALL: [Site; 28] = [
        Site::Embed,
        Site::PosEmbed,
        Site::ResidPre,
        Site::Ln1,
        Site::Q,
        Site::K,
        Site::V,
        Site::QNormed,
        Site::KNormed,
        Site::RotQ,
        Site::RotK,
        Site::Pattern,
        Site::Z,
        Site::Ln1Post,
        Site::AttnOut,
        Site::ResidMid,
        Site::Ln2,
        Site::RouterLogits,
        Site::ExpertIds,
        Site::ExpertWeights,
        Site::MlpPre,
        Site::MlpPreLinear,
        Site::MlpPost,
        Site::Ln2Post,
        Site::MlpOut,
        Site::ResidPost,
        Site::LnFinal,
        Site::Logits,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// Sites outside any block.
    pub fn is_global(self) -> bool {
        matches!(self, Site::Embed | Site::PosEmbed | Site::LnFinal | Site::Logits)
    }

    /// The name suffix: `attn.hook_q` for [`Site::Q`].
    pub fn suffix(self) -> &'static str {
        match self {
            Site::Embed => "hook_embed",
            Site::PosEmbed => "hook_pos_embed",
            Site::ResidPre => "hook_resid_pre",
            Site::Ln1 => "ln1.hook_normalized",
            Site::Q => "attn.hook_q",
            Site::K => "attn.hook_k",
            Site::V => "attn.hook_v",
            Site::QNormed => "attn.hook_q_normed",
            Site::KNormed => "attn.hook_k_normed",
            Site::RotQ => "attn.hook_rot_q",
            Site::RotK => "attn.hook_rot_k",
            Site::Pattern => "attn.hook_pattern",
            Site::Z => "attn.hook_z",
            Site::Ln1Post => "ln1_post.hook_normalized",
            Site::AttnOut => "hook_attn_out",
            Site::ResidMid => "hook_resid_mid",
            Site::Ln2 => "ln2.hook_normalized",
            Site::RouterLogits => "mlp.hook_router_logits",
            Site::ExpertIds => "mlp.hook_expert_ids",
            Site::ExpertWeights => "mlp.hook_expert_weights",
            Site::MlpPre => "mlp.hook_pre",
            Site::MlpPreLinear => "mlp.hook_pre_linear",
            Site::MlpPost => "mlp.hook_post",
            Site::Ln2Post => "ln2_post.hook_normalized",
            Site::MlpOut => "hook_mlp_out",
            Site::ResidPost => "hook_resid_post",
            Site::LnFinal => "ln_final.hook_normalized",
            Site::Logits => "logits",
        }
    }
}

/// A hook point: a site, in a block for the per-block sites.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HookName {
    pub layer: Option<u16>,
    pub site: Site,
}

impl HookName {
    pub const fn global(site: Site) -> Self {
        HookName { layer: None, site }
    }
    pub const fn block(layer: usize, site: Site) -> Self {
        HookName { layer: Some(layer as u16), site }
    }

    /// Dense index in `0..HookName::index_count(n_layers)`: globals first, then block sites.
    #[inline]
    pub fn index(self) -> usize {
        match self.layer {
            None => self.site as usize,
            Some(l) => Site::COUNT * (1 + l as usize) + self.site as usize,
        }
    }

    pub fn index_count(n_layers: usize) -> usize {
        Site::COUNT * (n_layers + 1)
    }
}

impl fmt::Display for HookName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.layer {
            None => f.write_str(self.site.suffix()),
            Some(l) => write!(f, "blocks.{l}.{}", self.site.suffix()),
        }
    }
}

/// Serialized as its canonical name (`blocks.3.attn.hook_q`).
impl serde::Serialize for HookName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for HookName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("unknown hook name `{0}` (names look like `blocks.3.attn.hook_q` or `hook_embed`; see HOOKS.md)")]
    UnknownName(String),
    #[error("hook pattern `{0}` matches no hook point of this model")]
    NoMatch(String),
    #[error("malformed hook pattern `{pattern}`: {why}")]
    BadPattern { pattern: String, why: &'static str },
}

impl FromStr for HookName {
    type Err = HookError;
    fn from_str(s: &str) -> Result<Self, HookError> {
        let unknown = || HookError::UnknownName(s.to_string());
        let (layer, suffix) = match s.strip_prefix("blocks.") {
            Some(rest) => {
                let (num, suffix) = rest.split_once('.').ok_or_else(unknown)?;
                let layer: u16 = num.parse().map_err(|_| unknown())?;
                (Some(layer), suffix)
            }
            None => (None, s),
        };
        let site = Site::ALL
            .iter()
            .copied()
            .find(|site| site.suffix() == suffix && site.is_global() == layer.is_none())
            .ok_or_else(unknown)?;
        Ok(HookName { layer, site })
    }
}

/// A glob over hook names: `*` (any run of characters), `?`, and `{a,b,c}` alternatives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookPattern {
    source: String,
    alternatives: Vec<String>,
}

impl HookPattern {
    pub fn parse(pattern: &str) -> Result<Self, HookError> {
        let bad = |why| HookError::BadPattern { pattern: pattern.to_string(), why };
        if pattern.is_empty() {
            return Err(bad("empty pattern"));
        }
        let alternatives = expand_braces(pattern).ok_or_else(|| bad("unbalanced or nested braces"))?;
        Ok(HookPattern { source: pattern.to_string(), alternatives })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, name: &str) -> bool {
        self.alternatives.iter().any(|alt| wildcard_match(alt.as_bytes(), name.as_bytes()))
    }

    /// The names among `available` this pattern selects; an error when none.
    pub fn select(&self, available: &[HookName]) -> Result<Vec<HookName>, HookError> {
        let hits: Vec<HookName> =
            available.iter().copied().filter(|n| self.matches(&n.to_string())).collect();
        if hits.is_empty() {
            // Distinguish a typo in a literal name from a pattern that selects nothing.
            let literal = !self.source.contains(['*', '?', '{']);
            return Err(if literal && self.source.parse::<HookName>().is_err() {
                HookError::UnknownName(self.source.clone())
            } else {
                HookError::NoMatch(self.source.clone())
            });
        }
        Ok(hits)
    }
}

/// Resolve user patterns against a model's hook names: every pattern must match something;
/// the result keeps forward order and has no duplicates.
pub fn resolve_patterns<S: AsRef<str>>(patterns: &[S], available: &[HookName]) -> Result<Vec<HookName>, HookError> {
    let mut picked = std::collections::BTreeSet::new();
    for p in patterns {
        picked.extend(HookPattern::parse(p.as_ref())?.select(available)?);
    }
    Ok(available.iter().copied().filter(|n| picked.contains(n)).collect())
}

/// Up to `k` hook names closest to `pattern` (edit distance), for "did you mean" messages.
pub fn close_names(pattern: &str, available: &[HookName], k: usize) -> Vec<String> {
    let p: Vec<char> = pattern.chars().collect();
    let mut scored: Vec<(usize, String)> = available
        .iter()
        .map(|n| {
            let name = n.to_string();
            (edit_distance(&p, &name.chars().collect::<Vec<_>>()), name)
        })
        .collect();
    scored.sort();
    scored.into_iter().take(k).map(|(_, n)| n).collect()
}

fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == cb { prev } else { 1 + prev.min(row[j]).min(row[j + 1]) };
            prev = cur;
        }
    }
    row[b.len()]
}

fn expand_braces(p: &str) -> Option<Vec<String>> {
    let Some(open) = p.find('{') else {
        return (!p.contains('}')).then(|| vec![p.to_string()]);
    };
    let close = open + p[open..].find('}')?;
    let inner = &p[open + 1..close];
    if inner.contains('{') {
        return None;
    }
    let rest = expand_braces(&p[close + 1..])?;
    let mut out = Vec::new();
    for choice in inner.split(',') {
        for tail in &rest {
            out.push(format!("{}{}{}", &p[..open], choice, tail));
        }
    }
    Some(out)
}

fn wildcard_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n_layers: usize) -> Vec<HookName> {
        let mut v = vec![HookName::global(Site::Embed)];
        for l in 0..n_layers {
            for s in Site::ALL.iter().filter(|s| !s.is_global()) {
                v.push(HookName::block(l, *s));
            }
        }
        v.push(HookName::global(Site::LnFinal));
        v.push(HookName::global(Site::Logits));
        v
    }

    fn check(pattern: &str, expect: &str) {
        let got = match HookPattern::parse(pattern).and_then(|p| p.select(&names(12))) {
            Ok(v) => v.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" "),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expect, "pattern {pattern}");
    }

    #[test]
    fn round_trip_every_name() {
        for n in names(3) {
            assert_eq!(n.to_string().parse::<HookName>().unwrap(), n);
        }
        assert!("blocks.x.hook_q".parse::<HookName>().is_err());
        assert!("blocks.1.hook_embed".parse::<HookName>().is_err());
        assert!("hook_resid_pre".parse::<HookName>().is_err());
    }

    #[test]
    fn index_is_dense_and_unique() {
        let all = names(4);
        let mut idx: Vec<usize> = all.iter().map(|n| n.index()).collect();
        idx.sort();
        idx.dedup();
        assert_eq!(idx.len(), all.len());
        assert!(idx.iter().all(|&i| i < HookName::index_count(4)));
    }

    #[test]
    fn globs() {
        check("hook_embed", "hook_embed");
        check("blocks.{0,5,11}.attn.hook_z", "blocks.0.attn.hook_z blocks.5.attn.hook_z blocks.11.attn.hook_z");
        check("blocks.1?.hook_resid_post", "blocks.10.hook_resid_post blocks.11.hook_resid_post");
        check("blocks.3.ln*", "blocks.3.ln1.hook_normalized blocks.3.ln1_post.hook_normalized blocks.3.ln2.hook_normalized blocks.3.ln2_post.hook_normalized");
        check("blocks.2.hook_qq", "error: unknown hook name `blocks.2.hook_qq` (names look like `blocks.3.attn.hook_q` or `hook_embed`; see HOOKS.md)");
        check("blocks.40.hook_resid_pre", "error: hook pattern `blocks.40.hook_resid_pre` matches no hook point of this model");
        check("blocks.{1,2.hook_q", "error: malformed hook pattern `blocks.{1,2.hook_q`: unbalanced or nested braces");
        check("*.mlp.hook_pre_linear", &(0..12).map(|i| format!("blocks.{i}.mlp.hook_pre_linear")).collect::<Vec<_>>().join(" "));
    }
}
