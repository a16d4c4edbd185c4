//! Chat templates rendered with minijinja the way transformers renders them with Jinja2:
//! `trim_blocks` and `lstrip_blocks` on, Python string methods, `raise_exception`,
//! `strftime_now`, and a `tojson` that prints what Python's `json.dumps` prints.

use crate::error::{ModelError, Result};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use std::fmt::Write;

pub struct ChatTemplate {
    env: Environment<'static>,
}

/// Everything a template may read besides `messages`.
#[derive(Clone, Debug, Default)]
pub struct ChatContext {
    pub add_generation_prompt: bool,
    pub bos_token: String,
    pub eos_token: String,
    /// Extra variables (`date_string`, `tools`, `enable_thinking`, ...).
    pub vars: serde_json::Map<String, serde_json::Value>,
}

/// Template instructions one render may run (a long conversation takes well under 1%).
const TEMPLATE_FUEL: u64 = 50_000_000;

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        // Bounded work per render: a template (from a model file) can never hang the server.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function("strftime_now", |fmt: String| -> std::result::Result<String, Error> {
            // `to_string` would panic on a bad format; writing reports it.
            use std::fmt::Write;
            let mut out = String::new();
            write!(out, "{}", chrono::Local::now().format(&fmt)).map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("bad strftime format `{fmt}`")))?;
            Ok(out)
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::ChatTemplate(format!("cannot parse template: {e}")))?;
        Ok(ChatTemplate { env })
    }

    /// Render `messages` (a JSON array of `{role, content, ...}`).
    pub fn render(&self, messages: &serde_json::Value, ctx: &ChatContext) -> Result<String> {
        let mut vars = ctx.vars.clone();
        vars.insert("messages".into(), messages.clone());
        vars.insert("add_generation_prompt".into(), ctx.add_generation_prompt.into());
        vars.insert("bos_token".into(), ctx.bos_token.clone().into());
        vars.insert("eos_token".into(), ctx.eos_token.clone().into());
        let tmpl = self.env.get_template("chat").map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        tmpl.render(Value::from_serialize(&vars)).map_err(|e| {
            // raise_exception's message is what users need; minijinja appends its location.
            let msg = match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or_default().to_string(),
                _ => e.to_string(),
            };
            ModelError::ChatTemplate(msg)
        })
    }
}

/// Python `json.dumps(x, ensure_ascii=False, indent=indent)`, as transformers' `tojson`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, &value, indent, sort_keys.unwrap_or(false), 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(out: &mut String, v: &Value, indent: Option<usize>, sort: bool, depth: usize) -> std::result::Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                let _ = write!(out, "{i}");
            } else {
                let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
                    let _ = write!(out, "{f:.1}");
                } else if f.is_nan() {
                    out.push_str("NaN");
                } else {
                    let _ = write!(out, "{f}");
                }
            }
        }
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, sort, depth + 1)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if sort {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json_str(out, &k.to_string());
                out.push_str(": ");
                write_json(out, &v.get_item(k)?, indent, sort, depth + 1)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => write_json_str(out, &v.to_string()),
    }
    Ok(())
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
