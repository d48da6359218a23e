//! The Route's section of `swocloud status`: the registered IM servers,
//! the Route nodes holding them (every node's, from the shared registry),
//! and the Redis state, asked of the running Route over its own HTTP port
//! (`/api/servers` with the api_key, and `/ready`), so the answer is what
//! the workers see. The Redis URL is never printed (it may hold a password). A Route that does not answer is reported, not fatal:
//! the process table above it is still right.

use serde_json::{json, Value};

use crate::cli::{local_http_get, StatusExtra};
use crate::config::Settings;
use crate::route::settings::RouteSettings;

/// Builds the section (the `status` hook of the `swocloud` binary).
pub fn section(settings: &Settings, cfg: &RouteSettings) -> StatusExtra {
    let mut extra = StatusExtra::default();
    let key = Some(cfg.api_key.as_str());
    let mut text = String::new();
    match local_http_get(settings, "/api/servers", key) {
        Ok((200, body)) => {
            let doc: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let servers = doc["servers"].as_array().cloned().unwrap_or_default();
            text.push_str(&format!(
                "\nIM servers: {} (source {})\n",
                servers.len(),
                doc["source"].as_str().unwrap_or("?")
            ));
            if !servers.is_empty() {
                text.push_str(&format!(
                    "{:<20} {:<22} {:>8} {:<9} {}\n",
                    "NAME", "ADDRESS", "USERS", "STATE", "NODE/WORKER"
                ));
            }
            for s in &servers {
                let addr = format!(
                    "{}:{}",
                    s["ip"].as_str().unwrap_or("?"),
                    s["port"].as_u64().unwrap_or(0)
                );
                text.push_str(&format!(
                    "{:<20} {:<22} {:>8} {:<9} {}/{}\n",
                    s["serviceName"].as_str().unwrap_or("?"),
                    addr,
                    s["load"].as_u64().unwrap_or(0),
                    if s["draining"].as_bool() == Some(true) {
                        "draining"
                    } else {
                        "live"
                    },
                    s["node"].as_str().unwrap_or("?"),
                    s["worker"].as_u64().unwrap_or(0),
                ));
            }
            text.push_str(&nodes_text(&doc));
            extra
                .json
                .insert("im_servers".into(), Value::Array(servers));
            extra
                .json
                .insert("route_nodes".into(), doc["nodes"].clone());
            extra.json.insert("route_node".into(), doc["node"].clone());
        }
        Ok((code, body)) => {
            text.push_str(&format!(
                "\nIM servers: unavailable (/api/servers answered {code}: {})\n",
                body.trim()
            ));
            extra.json.insert(
                "im_servers".into(),
                json!({"error": format!("HTTP {code}"), "body": body.trim()}),
            );
        }
        Err(e) => {
            text.push_str(&format!("\nIM servers: unavailable ({e})\n"));
            extra
                .json
                .insert("im_servers".into(), json!({"error": e.to_string()}));
        }
    }
    let redis = match local_http_get(settings, "/ready", None) {
        Ok((code, body)) => {
            let doc: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let reasons = doc["reasons"].clone();
            let ok = code == 200;
            text.push_str(&format!(
                "Redis: {} ({})\n",
                if ok { "ok" } else { "NOT READY" },
                if ok {
                    "the workers' Redis link and registry cache are fresh".to_string()
                } else {
                    reasons
                        .as_array()
                        .map(|r| {
                            r.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join("; ")
                        })
                        .unwrap_or_else(|| format!("HTTP {code}"))
                }
            ));
            json!({"ready": ok, "reasons": reasons})
        }
        Err(e) => {
            text.push_str(&format!("Redis: unknown ({e})\n"));
            json!({"ready": Value::Null, "error": e.to_string()})
        }
    };
    extra.json.insert("redis".into(), redis);
    extra.text = text;
    extra
}

/// The "Route nodes" lines of an `/api/servers` document: every node the
/// registry names, with its IM servers; the node that answered is marked.
fn nodes_text(doc: &Value) -> String {
    let nodes = doc["nodes"].as_array().cloned().unwrap_or_default();
    let me = doc["node"].as_str().unwrap_or("?");
    let mut text = format!("\nRoute nodes: {} (this node: {me})\n", nodes.len());
    for n in &nodes {
        let name = n["node"].as_str().unwrap_or("?");
        let servers: Vec<&str> = n["servers"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mark = if name == me { " *" } else { "" };
        text.push_str(&format!(
            "{:<28} {} IM server(s): {}\n",
            format!("{name}{mark}"),
            servers.len(),
            servers.join(", ")
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_node_of_the_registry_is_listed() {
        let doc = serde_json::json!({
            "node": "b",
            "nodes": [{"node": "a", "servers": ["IM_0"]}, {"node": "b", "servers": ["IM_1", "IM_2"]}],
        });
        let t = super::nodes_text(&doc);
        assert!(t.contains("Route nodes: 2 (this node: b)"), "{t}");
        assert!(
            t.contains("a ") && t.contains("1 IM server(s): IM_0"),
            "{t}"
        );
        assert!(t.contains("b *") && t.contains("IM_1, IM_2"), "{t}");
    }
}
