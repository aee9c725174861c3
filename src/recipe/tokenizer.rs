//! The tokenizer options of a recipe, as mergekit 0.1.5 reads them: `tokenizer_source` (whose
//! tokenizer files the soup gets) and `chat_template` (the template it gets instead of the
//! tokenizer's own).
//!
//! `chat_template` is one of mergekit's built-in names (`alpaca`, `chatml`, `exaone`,
//! `llama3`, `mistral`; ladle's own renderings of those formats, `assets/chat_templates/`, whose
//! text may differ from mergekit's files) or a Jinja template;
//! mergekit's rule tells them apart: a string under 256 characters with no line break and no
//! `{` that names a built-in template is that template; otherwise a string of at least 20
//! characters holding a `{` is a template; anything else is refused. `auto` (mergekit picks the
//! most common template among the inputs) is refused by name.

use super::RecipeError;

/// Templates for mergekit 0.1.5's built-in names (ladle's own text of each format).
pub const CHAT_TEMPLATES: [(&str, &str); 5] = [
    (
        "alpaca",
        include_str!("../../assets/chat_templates/alpaca.jinja"),
    ),
    (
        "chatml",
        include_str!("../../assets/chat_templates/chatml.jinja"),
    ),
    (
        "exaone",
        include_str!("../../assets/chat_templates/exaone.jinja"),
    ),
    (
        "llama3",
        include_str!("../../assets/chat_templates/llama3.jinja"),
    ),
    (
        "mistral",
        include_str!("../../assets/chat_templates/mistral.jinja"),
    ),
];

/// The longest chat template accepted (a template is part of the stored recipe).
pub const MAX_CHAT_TEMPLATE: usize = 64 * 1024;

/// The template text `chat_template` (as written) stands for.
pub fn chat_template(written: &str) -> Result<String, RecipeError> {
    let invalid = |m: String| RecipeError::invalid("chat_template", m);
    let names = || {
        CHAT_TEMPLATES
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if written == "auto" {
        return Err(invalid(format!(
            "`auto` (the most common template among the inputs) is not supported; name one of \
             mergekit's templates ({}) or give a Jinja template",
            names()
        )));
    }
    let name_like = written.len() < 256 && !written.contains('\n') && !written.contains('{');
    if name_like && let Some((_, text)) = CHAT_TEMPLATES.iter().find(|(n, _)| *n == written) {
        return Ok((*text).to_string());
    }
    if written.len() < 20 || !written.contains('{') {
        return Err(invalid(format!(
            "{written:?} is neither one of mergekit's templates ({}) nor a Jinja template (at \
             least 20 characters, with a `{{`)",
            names()
        )));
    }
    if written.len() > MAX_CHAT_TEMPLATE {
        return Err(invalid(format!(
            "a template of {} bytes; at most {MAX_CHAT_TEMPLATE} are accepted",
            written.len()
        )));
    }
    Ok(written.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_templates_and_refusals() {
        let chatml = chat_template("chatml").unwrap();
        assert!(
            chatml.starts_with("{% for message in messages %}"),
            "{chatml}"
        );
        for (name, text) in CHAT_TEMPLATES {
            assert!(text.contains('{'), "{name}");
            assert_eq!(chat_template(name).unwrap(), text);
        }
        let own = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
        assert_eq!(chat_template(own).unwrap(), own);
        for bad in [
            "auto",
            "vicuna",
            "{{ x }}",
            "",
            "no braces in this long string",
        ] {
            let e = chat_template(bad).unwrap_err();
            assert_eq!(e.field(), Some("chat_template"), "{bad}");
        }
        assert!(chat_template(&format!("{{{}", "x".repeat(MAX_CHAT_TEMPLATE))).is_err());
    }
}
