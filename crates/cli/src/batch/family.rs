//! Model families: how a stage's prompt becomes model input and how output becomes a field.
//! One small trait; a new family is one more implementation here.

use serde_json::{json, Value};

/// What a backend sends: raw text (completion) or chat messages (the model's template).
#[derive(Clone, Debug)]
pub enum Input {
    Text(String),
    Chat(Vec<Value>),
}

pub trait Family: Send + Sync {
    fn name(&self) -> &'static str;
    /// Chat unless a stage says otherwise.
    fn chats(&self) -> bool;
    /// The field's value from the model's text.
    fn clean(&self, text: &str) -> String {
        text.trim().to_string()
    }
}

/// Base models without a chat template (e.g. stories260K): prompts go in as text.
pub struct Plain;
/// Instruction models with a chat template.
pub struct Chat;
/// Reasoning models (Qwen3, DeepSeek-R1): chat, and the `<think>` block is not the answer.
pub struct Thinking;

impl Family for Plain {
    fn name(&self) -> &'static str {
        "plain"
    }
    fn chats(&self) -> bool {
        false
    }
}

impl Family for Chat {
    fn name(&self) -> &'static str {
        "chat"
    }
    fn chats(&self) -> bool {
        true
    }
}

impl Family for Thinking {
    fn name(&self) -> &'static str {
        "thinking"
    }
    fn chats(&self) -> bool {
        true
    }
    fn clean(&self, text: &str) -> String {
        let answer = match (text.find("<think>"), text.find("</think>")) {
            (_, Some(end)) => &text[end + "</think>".len()..],
            // Cut off while still thinking: there is no answer.
            (Some(_), None) => "",
            (None, None) => text,
        };
        answer.trim().to_string()
    }
}

/// By name (`--spec`'s `family`), or guessed from the model's name and whether it has a chat
/// template.
pub fn choose(named: Option<&str>, model_name: &str, has_template: bool) -> anyhow::Result<Box<dyn Family>> {
    Ok(match named {
        Some("plain") => Box::new(Plain),
        Some("chat") => Box::new(Chat),
        Some("thinking") => Box::new(Thinking),
        Some(other) => anyhow::bail!("unknown model family `{other}` (plain, chat or thinking)"),
        None => {
            let n = model_name.to_lowercase();
            if n.contains("qwen3") || n.contains("deepseek-r1") || n.contains("qwq") {
                Box::new(Thinking)
            } else if has_template {
                Box::new(Chat)
            } else {
                Box::new(Plain)
            }
        }
    })
}

/// The input for a stage: its rendered prompt, as chat messages or text.
pub fn input(family: &dyn Family, chat: Option<bool>, system: Option<&str>, prompt: String) -> Input {
    if !chat.unwrap_or(family.chats()) {
        return Input::Text(prompt);
    }
    let mut messages = vec![];
    if let Some(s) = system {
        messages.push(json!({"role": "system", "content": s}));
    }
    messages.push(json!({"role": "user", "content": prompt}));
    Input::Chat(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinking_blocks_are_not_answers() {
        assert_eq!(Thinking.clean("<think>hmm</think>\n\nA cat."), "A cat.");
        assert_eq!(Thinking.clean("<think>still going"), "");
        assert_eq!(Thinking.clean(" plain "), "plain");
        assert_eq!(choose(None, "Qwen3-0.6B", true).unwrap().name(), "thinking");
        assert_eq!(choose(None, "stories260K", false).unwrap().name(), "plain");
        assert_eq!(choose(None, "SmolLM2", true).unwrap().name(), "chat");
        assert!(choose(Some("nope"), "x", true).is_err());
    }
}
