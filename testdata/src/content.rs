//! Renders the bytes of one generated file from its kind, seed and target size.
//!
//! Text is built to look like what a PHP application ships (namespaced classes, config arrays, route
//! files, Blade views, JSON, JS, CSS) so that delta and compression figures measured on it are close to
//! real ones. Binary assets are random bytes behind a plausible header, so they do not compress.
//! Rendering depends only on its inputs, which is what keeps a corpus reproducible from its seed.

use std::fmt::Write as _;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a generated file looks like inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    PhpClass,
    PhpConfig,
    PhpRoutes,
    PhpScript,
    Migration,
    Blade,
    Js,
    Css,
    Json,
    Markdown,
    Text,
    Png,
    Font,
    Icon,
    Blob,
}

impl Kind {
    pub(crate) fn is_binary(self) -> bool {
        matches!(self, Kind::Png | Kind::Font | Kind::Icon | Kind::Blob)
    }
}

pub(crate) const NOUNS: &[&str] = &[
    "Request",
    "Response",
    "Cache",
    "Store",
    "Event",
    "Listener",
    "Handler",
    "Factory",
    "Builder",
    "Resolver",
    "Manager",
    "Provider",
    "Repository",
    "Collection",
    "Query",
    "Grammar",
    "Connection",
    "Session",
    "Token",
    "Guard",
    "Policy",
    "Middleware",
    "Router",
    "Route",
    "Controller",
    "Validator",
    "Rule",
    "Message",
    "Mailer",
    "Queue",
    "Job",
    "Worker",
    "Pipeline",
    "Container",
    "Config",
    "Loader",
    "Parser",
    "Lexer",
    "Node",
    "Visitor",
    "Compiler",
    "Formatter",
    "Logger",
    "Stream",
    "Client",
    "Adapter",
    "Filesystem",
    "Path",
    "Uri",
    "Header",
    "Cookie",
    "Encoder",
    "Decoder",
    "Serializer",
    "Normalizer",
    "Transformer",
    "Command",
    "Input",
    "Output",
    "Table",
    "Schema",
    "Column",
    "Index",
    "Migration",
    "Seeder",
    "Model",
    "Relation",
    "Scope",
    "Attribute",
    "Cast",
    "Locale",
    "Translator",
    "Money",
    "Currency",
    "Image",
    "Color",
    "Theme",
    "View",
    "Component",
    "Slot",
    "Engine",
    "Renderer",
    "Template",
    "Asset",
    "Bundle",
    "Plugin",
    "Extension",
    "Registry",
    "Dispatcher",
    "Subscriber",
    "Notification",
    "Channel",
    "Broadcast",
    "Signal",
    "Lock",
    "Limiter",
    "Throttle",
    "Retry",
    "Clock",
    "Timer",
    "Profiler",
    "Dumper",
    "Frame",
    "Exception",
];

pub(crate) const PREFIXES: &[&str] = &[
    "Abstract",
    "Base",
    "Default",
    "Simple",
    "Lazy",
    "Cached",
    "Array",
    "Json",
    "Http",
    "File",
    "Memory",
    "Redis",
    "Database",
    "Null",
    "Chain",
    "Composite",
    "Async",
    "Secure",
    "Signed",
    "Encrypted",
    "Compiled",
    "Native",
    "Pending",
    "Scoped",
    "Tagged",
    "Fallback",
    "Queued",
    "Batch",
];

const VERBS: &[&str] = &[
    "handle",
    "resolve",
    "build",
    "make",
    "create",
    "find",
    "load",
    "parse",
    "compile",
    "render",
    "dispatch",
    "register",
    "boot",
    "validate",
    "normalize",
    "transform",
    "encode",
    "decode",
    "send",
    "flush",
    "reset",
    "merge",
    "apply",
    "filter",
    "map",
    "push",
    "has",
    "set",
    "remove",
    "with",
    "without",
    "to",
    "from",
    "is",
    "should",
    "can",
    "fetch",
    "store",
    "forget",
    "prepare",
    "guard",
];

const OBJECTS: &[&str] = &[
    "Item",
    "Value",
    "Key",
    "Name",
    "Path",
    "Options",
    "Attributes",
    "Headers",
    "Body",
    "Config",
    "Driver",
    "Connection",
    "Listener",
    "Event",
    "Route",
    "Parameters",
    "Bindings",
    "Context",
    "Result",
    "Response",
    "Request",
    "Message",
    "Token",
    "Payload",
    "Chunk",
    "Buffer",
    "Stream",
    "Locale",
    "Format",
    "Pattern",
    "Rules",
    "Errors",
    "Children",
    "Parent",
    "Entry",
    "Record",
];

const VARS: &[&str] = &[
    "value",
    "key",
    "items",
    "options",
    "name",
    "path",
    "config",
    "request",
    "response",
    "result",
    "callback",
    "context",
    "attributes",
    "default",
    "parameters",
    "payload",
    "index",
    "count",
    "buffer",
    "event",
    "listener",
    "handler",
    "driver",
    "locale",
];

const TYPES: &[&str] = &[
    "string", "int", "bool", "array", "?string", "mixed", "callable", "iterable", "float",
    "?array", "static", "self",
];

const WORDS: &[&str] = &[
    "the",
    "a",
    "given",
    "value",
    "when",
    "is",
    "not",
    "this",
    "instance",
    "will",
    "be",
    "used",
    "to",
    "resolve",
    "current",
    "request",
    "default",
    "driver",
    "for",
    "if",
    "none",
    "was",
    "set",
    "on",
    "and",
    "of",
    "cache",
    "store",
    "return",
    "each",
    "item",
    "in",
    "collection",
    "an",
    "exception",
    "thrown",
    "should",
    "connection",
    "configured",
    "listener",
    "registered",
    "with",
    "container",
    "before",
    "after",
    "handler",
    "runs",
    "query",
    "builder",
    "callback",
    "array",
    "key",
    "missing",
    "attribute",
    "events",
    "queue",
    "locale",
    "fallback",
    "application",
    "service",
    "provider",
];

const STRINGS: &[&str] = &[
    "default",
    "driver",
    "connection",
    "timeout",
    "prefix",
    "database",
    "redis",
    "file",
    "array",
    "sync",
    "local",
    "public",
    "web",
    "api",
    "auth",
    "guest",
    "throttle:60,1",
    "utf8mb4",
    "en",
    "UTC",
];

fn pick<'a>(rng: &mut ChaCha8Rng, list: &[&'a str]) -> &'a str {
    list[rng.gen_range(0..list.len())]
}

/// Renders a file. `path` is the file's path inside release a (or b for added files): PHP namespaces
/// and class names are taken from it, as Composer's PSR-4 autoloading would require.
pub(crate) fn render(path: &str, kind: Kind, seed: u64, size: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    match kind {
        Kind::PhpClass => php_class(&mut rng, path, size).into_bytes(),
        Kind::PhpConfig => php_config(&mut rng, size).into_bytes(),
        Kind::PhpRoutes => php_routes(&mut rng, size).into_bytes(),
        Kind::PhpScript => php_script(&mut rng, size).into_bytes(),
        Kind::Migration => migration(&mut rng, size).into_bytes(),
        Kind::Blade => blade(&mut rng, size).into_bytes(),
        Kind::Js => js(&mut rng, size).into_bytes(),
        Kind::Css => css(&mut rng, size).into_bytes(),
        Kind::Json => json(&mut rng, size).into_bytes(),
        Kind::Markdown => markdown(&mut rng, size).into_bytes(),
        Kind::Text => text(&mut rng, size).into_bytes(),
        Kind::Png => binary(&mut rng, b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", size),
        Kind::Font => binary(&mut rng, b"wOF2\0\x01\0\0", size),
        Kind::Icon => binary(&mut rng, b"\0\0\x01\0\x01\0", size),
        Kind::Blob => binary(&mut rng, b"", size),
    }
}

fn binary(rng: &mut ChaCha8Rng, header: &[u8], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size.max(header.len())];
    out[..header.len()].copy_from_slice(header);
    rng.fill_bytes(&mut out[header.len()..]);
    out
}

/// Splits a generated path into the PHP namespace and class name Composer would expect for it.
pub(crate) fn php_names(path: &str) -> (String, String) {
    let stem = path.strip_suffix(".php").unwrap_or(path);
    let mut parts: Vec<&str> = stem.split('/').collect();
    let class = parts.pop().unwrap_or("Generated").to_string();
    let mut ns = Vec::new();
    if parts.first() == Some(&"vendor") && parts.len() >= 4 {
        ns.push(studly(parts[1]));
        ns.push(studly(parts[2]));
        let rest = &parts[3..];
        if rest.first() == Some(&"tests") {
            ns.push("Tests".to_string());
        }
        ns.extend(rest.iter().skip(1).map(|p| studly(p)));
    } else {
        ns.extend(parts.iter().map(|p| studly(p)));
    }
    if ns.is_empty() {
        ns.push("App".to_string());
    }
    (ns.join("\\"), class)
}

/// `event-dispatcher` → `EventDispatcher`, `app` → `App`.
pub(crate) fn studly(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for part in s.split(['-', '_', '.']) {
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.extend(first.to_uppercase());
            out.push_str(chars.as_str());
        }
    }
    out
}

fn comment_words(rng: &mut ChaCha8Rng, out: &mut String, words: std::ops::Range<usize>) {
    let n = rng.gen_range(words);
    for i in 0..n {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(pick(rng, WORDS));
    }
}

fn method_name(rng: &mut ChaCha8Rng) -> String {
    let mut s = String::from(pick(rng, VERBS));
    s.push_str(pick(rng, OBJECTS));
    s
}

fn php_class(rng: &mut ChaCha8Rng, path: &str, size: usize) -> String {
    let (ns, class) = php_names(path);
    let mut out = String::with_capacity(size + 512);
    out.push_str("<?php\n\n");
    if rng.gen_bool(0.6) {
        out.push_str("declare(strict_types=1);\n\n");
    }
    let _ = write!(out, "namespace {ns};\n\n");
    let root = ns.split('\\').next().unwrap_or("App").to_string();
    let mut uses: Vec<String> = (0..rng.gen_range(2..8))
        .map(|_| format!("{root}\\{}\\{}", pick(rng, NOUNS), pick(rng, NOUNS)))
        .collect();
    uses.sort();
    uses.dedup();
    for u in &uses {
        let _ = writeln!(out, "use {u};");
    }
    out.push_str("\n/**\n * ");
    comment_words(rng, &mut out, 6..14);
    out.push_str(".\n *\n * @internal\n */\n");
    let flavour = rng.gen_range(0..10);
    let decl = match flavour {
        0 => "interface",
        1 => "trait",
        2 | 3 => "abstract class",
        4 | 5 => "final class",
        _ => "class",
    };
    let _ = write!(out, "{decl} {class}");
    if decl.ends_with("class") && rng.gen_bool(0.4) {
        let _ = write!(out, " extends {}{}", pick(rng, PREFIXES), pick(rng, NOUNS));
    }
    if decl != "trait" && rng.gen_bool(0.5) {
        let _ = write!(out, " implements {}Interface", pick(rng, NOUNS));
    }
    out.push_str("\n{\n");
    if decl != "interface" {
        for _ in 0..rng.gen_range(1..6) {
            let vis = if rng.gen_bool(0.7) {
                "private"
            } else {
                "protected"
            };
            let _ = writeln!(
                out,
                "    {vis} {} ${};\n",
                pick(rng, TYPES).trim_start_matches('?'),
                pick(rng, VARS)
            );
        }
    }
    // Stop when half of another method would overshoot, so sizes land on target on average.
    let mut last = 0;
    while out.len() + last / 2 + 2 < size {
        let before = out.len();
        php_method(rng, &mut out, decl == "interface");
        last = out.len() - before;
    }
    out.push_str("}\n");
    out
}

fn php_method(rng: &mut ChaCha8Rng, out: &mut String, signature_only: bool) {
    let name = method_name(rng);
    let params: Vec<String> = (0..rng.gen_range(0..4))
        .map(|i| format!("{} ${}{}", pick(rng, TYPES), pick(rng, VARS), i))
        .collect();
    let ret = pick(rng, TYPES);
    out.push_str("    /**\n     * ");
    comment_words(rng, out, 5..16);
    out.push_str(".\n");
    for p in &params {
        let _ = writeln!(out, "     * @param {p}");
    }
    let _ = writeln!(out, "     * @return {ret}\n     */");
    let vis = match rng.gen_range(0..6) {
        0 => "protected",
        1 => "private",
        _ => "public",
    };
    let stat = if rng.gen_bool(0.1) { " static" } else { "" };
    let _ = write!(
        out,
        "    {vis}{stat} function {name}({}): {ret}",
        params.join(", ")
    );
    if signature_only {
        out.push_str(";\n\n");
        return;
    }
    out.push_str("\n    {\n");
    for _ in 0..rng.gen_range(2..9) {
        php_statement(rng, out, 2);
    }
    let _ = writeln!(
        out,
        "        return $this->{}(${});\n    }}\n",
        method_name(rng),
        pick(rng, VARS)
    );
}

fn indent(out: &mut String, depth: usize) {
    for _ in 0..depth {
        out.push_str("    ");
    }
}

fn php_statement(rng: &mut ChaCha8Rng, out: &mut String, depth: usize) {
    indent(out, depth);
    let choice = if depth > 3 {
        rng.gen_range(0..4)
    } else {
        rng.gen_range(0..7)
    };
    match choice {
        0 => {
            let _ = writeln!(
                out,
                "${} = $this->{}->{}(${});",
                pick(rng, VARS),
                pick(rng, VARS),
                method_name(rng),
                pick(rng, VARS)
            );
        }
        1 => {
            let _ = writeln!(
                out,
                "$this->{}[${}] = ${} ?? '{}';",
                pick(rng, VARS),
                pick(rng, VARS),
                pick(rng, VARS),
                pick(rng, STRINGS)
            );
        }
        2 => {
            out.push_str("// ");
            comment_words(rng, out, 4..12);
            out.push('\n');
        }
        3 => {
            let _ = writeln!(
                out,
                "${} = {}::{}(${}, {});",
                pick(rng, VARS),
                pick(rng, NOUNS),
                method_name(rng),
                pick(rng, VARS),
                rng.gen_range(0..4096)
            );
        }
        4 => {
            let _ = writeln!(out, "if (${} === null) {{", pick(rng, VARS));
            indent(out, depth + 1);
            let _ = write!(out, "throw new \\InvalidArgumentException('");
            comment_words(rng, out, 3..8);
            out.push_str("');\n");
            indent(out, depth);
            out.push_str("}\n\n");
        }
        5 => {
            let _ = writeln!(
                out,
                "foreach (${} as ${} => ${}) {{",
                pick(rng, VARS),
                pick(rng, VARS),
                pick(rng, VARS)
            );
            for _ in 0..rng.gen_range(1..4) {
                php_statement(rng, out, depth + 1);
            }
            indent(out, depth);
            out.push_str("}\n\n");
        }
        _ => {
            let _ = writeln!(
                out,
                "if ($this->{}(${}) && ! ${}) {{",
                method_name(rng),
                pick(rng, VARS),
                pick(rng, VARS)
            );
            for _ in 0..rng.gen_range(1..3) {
                php_statement(rng, out, depth + 1);
            }
            indent(out, depth);
            out.push_str("}\n");
        }
    }
}

fn php_config(rng: &mut ChaCha8Rng, size: usize) -> String {
    let mut out = String::with_capacity(size + 256);
    out.push_str("<?php\n\nuse Illuminate\\Support\\Str;\n\nreturn [\n\n");
    while out.len() + 4 < size {
        out.push_str("    /*\n    |");
        out.push_str(&"-".repeat(70));
        out.push_str("\n    | ");
        comment_words(rng, &mut out, 2..5);
        out.push_str("\n    |");
        out.push_str(&"-".repeat(70));
        out.push_str("\n    |\n    | ");
        comment_words(rng, &mut out, 8..16);
        out.push_str(".\n    |\n    */\n\n");
        let key = pick(rng, STRINGS).to_string();
        let _ = writeln!(out, "    '{key}' => [");
        for _ in 0..rng.gen_range(2..7) {
            let k = pick(rng, VARS);
            let _ = writeln!(
                out,
                "        '{k}' => env('{}_{}', '{}'),",
                key.to_uppercase().replace(':', "_"),
                k.to_uppercase(),
                pick(rng, STRINGS)
            );
        }
        out.push_str("    ],\n\n");
    }
    out.push_str("];\n");
    out
}

fn php_routes(rng: &mut ChaCha8Rng, size: usize) -> String {
    let mut out = String::with_capacity(size + 128);
    out.push_str("<?php\n\nuse Illuminate\\Support\\Facades\\Route;\n\n");
    while out.len() + 2 < size {
        let verb = ["get", "post", "put", "delete"][rng.gen_range(0..4)];
        let seg = pick(rng, VARS);
        let ctrl = pick(rng, NOUNS);
        let _ = writeln!(
            out,
            "Route::{verb}('/{seg}/{{{}}}', [{ctrl}Controller::class, '{}'])->name('{seg}.{verb}');",
            pick(rng, VARS),
            method_name(rng)
        );
        if rng.gen_bool(0.1) {
            let _ = writeln!(
                out,
                "\nRoute::middleware(['{}'])->group(function () {{\n    Route::get('/{}', fn () => view('{}'));\n}});\n",
                pick(rng, STRINGS),
                pick(rng, VARS),
                pick(rng, VARS)
            );
        }
    }
    out
}

fn php_script(rng: &mut ChaCha8Rng, size: usize) -> String {
    let mut out = String::with_capacity(size + 128);
    out.push_str("#!/usr/bin/env php\n<?php\n\ndefine('LARAVEL_START', microtime(true));\n\n");
    out.push_str("require __DIR__.'/vendor/autoload.php';\n\n");
    while out.len() + 2 < size {
        php_statement(rng, &mut out, 0);
    }
    out.push_str("exit($status);\n");
    out
}

fn migration(rng: &mut ChaCha8Rng, size: usize) -> String {
    let mut out = String::with_capacity(size + 256);
    out.push_str("<?php\n\nuse Illuminate\\Database\\Migrations\\Migration;\n");
    out.push_str("use Illuminate\\Database\\Schema\\Blueprint;\nuse Illuminate\\Support\\Facades\\Schema;\n\n");
    let table = pick(rng, VARS);
    let _ = write!(
        out,
        "return new class extends Migration\n{{\n    public function up(): void\n    {{\n        Schema::create('{table}s', function (Blueprint $table) {{\n            $table->id();\n"
    );
    while out.len() + 120 < size {
        let col =
            ["string", "integer", "boolean", "text", "timestamp", "json"][rng.gen_range(0..6)];
        let _ = writeln!(
            out,
            "            $table->{col}('{}_{}')->nullable();",
            pick(rng, VARS),
            pick(rng, VARS)
        );
    }
    let _ = write!(
        out,
        "            $table->timestamps();\n        }});\n    }}\n\n    public function down(): void\n    {{\n        Schema::dropIfExists('{table}s');\n    }}\n}};\n"
    );
    out
}

fn blade(rng: &mut ChaCha8Rng, size: usize) -> String {
    let mut out = String::with_capacity(size + 128);
    out.push_str("@extends('layouts.app')\n\n@section('content')\n");
    while out.len() + 16 < size {
        match rng.gen_range(0..4) {
            0 => {
                let _ = writeln!(
                    out,
                    "    <div class=\"{}-{} mt-{}\">\n        <h2>{{{{ __('{}') }}}}</h2>\n    </div>",
                    pick(rng, VARS),
                    pick(rng, VARS),
                    rng.gen_range(1..8),
                    pick(rng, WORDS)
                );
            }
            1 => {
                let v = pick(rng, VARS);
                let _ = writeln!(
                    out,
                    "    @foreach (${v}s as ${v})\n        <li>{{{{ ${v}->{} }}}}</li>\n    @endforeach",
                    pick(rng, VARS)
                );
            }
            2 => {
                out.push_str("    <p>");
                comment_words(rng, &mut out, 6..20);
                out.push_str("</p>\n");
            }
            _ => {
                let _ = writeln!(
                    out,
                    "    @if (${})\n        <x-{} :value=\"${}\" />\n    @endif",
                    pick(rng, VARS),
                    pick(rng, VARS),
                    pick(rng, VARS)
                );
            }
        }
    }
    out.push_str("@endsection\n");
    out
}

fn js(rng: &mut ChaCha8Rng, size: usize) -> String {
    let mut out = String::with_capacity(size + 128);
    out.push_str("'use strict';\n\nimport axios from 'axios';\n\n");
    while out.len() + 2 < size {
        let name = method_name(rng);
        let _ = writeln!(
            out,
            "export function {name}({}, {}) {{\n    const {} = {}?.{} ?? {};\n    if (!{}) {{\n        return null;\n    }}\n    return axios.get(`/api/{}/${{{}}}`);\n}}\n",
            pick(rng, VARS),
            pick(rng, VARS),
            pick(rng, VARS),
            pick(rng, VARS),
            pick(rng, VARS),
            rng.gen_range(0..100),
            pick(rng, VARS),
            pick(rng, VARS),
            pick(rng, VARS)
        );
    }
    out
}

fn css(rng: &mut ChaCha8Rng, size: usize) -> String {
    let mut out = String::with_capacity(size + 128);
    while out.len() + 2 < size {
        let _ = writeln!(
            out,
            ".{}-{} {{\n    margin: {}px {}px;\n    color: #{:06x};\n    display: {};\n}}\n",
            pick(rng, VARS),
            pick(rng, VARS),
            rng.gen_range(0..32),
            rng.gen_range(0..32),
            rng.gen_range(0..0xff_ffff),
            ["block", "flex", "grid", "none", "inline-block"][rng.gen_range(0..5)]
        );
    }
    out
}

fn json(rng: &mut ChaCha8Rng, size: usize) -> String {
    let mut out = String::with_capacity(size + 128);
    let _ = write!(
        out,
        "{{\n    \"name\": \"{}/{}\",\n    \"type\": \"library\",\n    \"license\": \"MIT\",\n    \"require\": {{\n        \"php\": \"^8.1\"",
        pick(rng, VARS),
        pick(rng, VARS)
    );
    while out.len() + 80 < size {
        let _ = write!(
            out,
            ",\n        \"{}/{}-{}\": \"^{}.{}\"",
            pick(rng, VARS),
            pick(rng, VARS),
            pick(rng, VARS),
            rng.gen_range(1..12),
            rng.gen_range(0..30)
        );
    }
    out.push_str("\n    },\n    \"minimum-stability\": \"stable\"\n}\n");
    out
}

fn markdown(rng: &mut ChaCha8Rng, size: usize) -> String {
    let mut out = String::with_capacity(size + 128);
    out.push_str("# ");
    comment_words(rng, &mut out, 3..4);
    out.push_str("\n\n");
    while out.len() + 2 < size {
        if rng.gen_bool(0.2) {
            out.push_str("## ");
            comment_words(rng, &mut out, 2..5);
            out.push_str("\n\n");
        }
        comment_words(rng, &mut out, 20..60);
        out.push_str(".\n\n");
    }
    out
}

fn text(rng: &mut ChaCha8Rng, size: usize) -> String {
    let mut out = String::with_capacity(size + 128);
    while out.len() + 2 < size {
        let _ = writeln!(
            out,
            "{}_{}={}",
            pick(rng, VARS).to_uppercase(),
            pick(rng, STRINGS).to_uppercase().replace(':', "_"),
            pick(rng, STRINGS)
        );
    }
    out
}

/// Makes a few small edits to a text file: lines inserted and lines changed, the way a developer's
/// commit touches a file, never a rewrite. At least one line is inserted, so the result always differs.
pub(crate) fn edit_text(content: &[u8], seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let lines: Vec<&[u8]> = content.split_inclusive(|&b| b == b'\n').collect();
    // Keep line 0 (`<?php`, a shebang, an opening brace) so the file stays recognisable.
    let ops = rng.gen_range(1..=3usize);
    let mut targets: Vec<(usize, bool)> = (0..ops)
        .map(|i| {
            let at = if lines.len() > 1 {
                rng.gen_range(1..lines.len())
            } else {
                lines.len()
            };
            (at, i == 0 || rng.gen_bool(0.5))
        })
        .collect();
    targets.sort_unstable();
    let mut out = Vec::with_capacity(content.len() + 256);
    let mut next = targets.iter().peekable();
    for (i, line) in lines.iter().enumerate() {
        let mut replaced = false;
        while let Some(&&(at, insert)) = next.peek() {
            if at != i {
                break;
            }
            next.next();
            if insert {
                for _ in 0..rng.gen_range(1..=4) {
                    let mut s = String::from("        // ");
                    comment_words(&mut rng, &mut s, 3..10);
                    s.push('\n');
                    out.extend_from_slice(s.as_bytes());
                }
            } else if !replaced {
                replaced = true;
                let body = line.strip_suffix(b"\n").unwrap_or(line);
                out.extend_from_slice(body);
                out.extend_from_slice(format!(" // rev {}\n", rng.gen_range(2..100)).as_bytes());
            }
        }
        if !replaced {
            out.extend_from_slice(line);
        }
    }
    for &(at, _) in next {
        debug_assert!(at >= lines.len());
        out.extend_from_slice(b"// appended\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn php_names_follow_psr4() {
        let cases = [
            (
                "vendor/kalo/http-kernel/src/Cache/Store.php",
                "Kalo\\HttpKernel\\Cache",
                "Store",
            ),
            (
                "vendor/kalo/http-kernel/src/Store.php",
                "Kalo\\HttpKernel",
                "Store",
            ),
            (
                "vendor/kalo/http-kernel/tests/Unit/StoreTest.php",
                "Kalo\\HttpKernel\\Tests\\Unit",
                "StoreTest",
            ),
            (
                "app/Http/Controllers/HomeController.php",
                "App\\Http\\Controllers",
                "HomeController",
            ),
        ];
        for (path, ns, class) in cases {
            assert_eq!(
                php_names(path),
                (ns.to_string(), class.to_string()),
                "{path}"
            );
        }
    }

    #[test]
    fn render_is_deterministic_and_near_the_target_size() {
        let kinds = [
            Kind::PhpClass,
            Kind::PhpConfig,
            Kind::PhpRoutes,
            Kind::PhpScript,
            Kind::Migration,
            Kind::Blade,
            Kind::Js,
            Kind::Css,
            Kind::Json,
            Kind::Markdown,
            Kind::Text,
            Kind::Png,
            Kind::Blob,
        ];
        for kind in kinds {
            let a = render("app/Models/User.php", kind, 7, 8000);
            let b = render("app/Models/User.php", kind, 7, 8000);
            let c = render("app/Models/User.php", kind, 8, 8000);
            assert_eq!(a, b, "{kind:?}");
            assert_ne!(a, c, "{kind:?}");
            assert!((7000..10_000).contains(&a.len()), "{kind:?}: {}", a.len());
            if !kind.is_binary() {
                assert!(std::str::from_utf8(&a).is_ok(), "{kind:?}");
            }
        }
    }

    #[test]
    fn php_class_declares_its_namespace_and_name() {
        let text = render(
            "vendor/kalo/http-kernel/src/Cache/Store.php",
            Kind::PhpClass,
            3,
            4000,
        );
        let text = String::from_utf8(text).unwrap();
        assert!(text.starts_with("<?php\n"));
        assert!(text.contains("namespace Kalo\\HttpKernel\\Cache;\n"));
        assert!(text.contains(" Store"));
        assert!(text.ends_with("}\n"));
    }

    #[test]
    fn edit_text_changes_a_few_lines_only() {
        let base = render("app/Models/User.php", Kind::PhpClass, 11, 12_000);
        for seed in 0..50 {
            let edited = edit_text(&base, seed);
            assert_ne!(edited, base, "seed {seed}");
            assert_eq!(edited, edit_text(&base, seed), "seed {seed}");
            let old: Vec<&[u8]> = base.split(|&b| b == b'\n').collect();
            let new: Vec<&[u8]> = edited.split(|&b| b == b'\n').collect();
            let kept = new.iter().filter(|l| old.contains(l)).count();
            // at most 3 ops × 4 inserted lines, plus changed lines
            assert!(
                new.len() - kept <= 15,
                "seed {seed}: {} lines differ",
                new.len() - kept
            );
            assert!(new.len() >= old.len(), "seed {seed}");
        }
    }
}
