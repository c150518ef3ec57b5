//! Framework methods: `tiercache_get_version`, `framework_get_reactors`, and the config
//! methods (`framework_get_subsystems`, `framework_get_config`, `save_config`) over the
//! `bdev` and `nbd` subsystems.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tiercache_engine::bdev::Bdev;
use tiercache_engine::cache::{mode_name, CachedBdev};
use tiercache_engine::reactor;
use tiercache_jsonrpc::config::ConfigEntry;
use tiercache_jsonrpc::schema::{FrameworkGetConfigParams, NoParams, SaveConfigParams};
use tiercache_jsonrpc::RpcError;

use super::{reg, reg_pre};
use crate::target::{lock, schema_clean, Target};

/// Ticks are nanoseconds.
pub const TICK_RATE: u64 = 1_000_000_000;

pub fn register(t: &Arc<Target>) -> Result<(), RpcError> {
    reg(t, "tiercache_get_version", |_t, _: NoParams| async move {
        let v = env!("CARGO_PKG_VERSION");
        let num = |s: &str| s.parse::<u64>().unwrap_or(0);
        Ok(json!({
            "version": format!("tiercache v{v}"),
            "fields": {
                "major": num(env!("CARGO_PKG_VERSION_MAJOR")),
                "minor": num(env!("CARGO_PKG_VERSION_MINOR")),
                "patch": num(env!("CARGO_PKG_VERSION_PATCH")),
                "suffix": env!("CARGO_PKG_VERSION_PRE"),
            }
        }))
    })?;
    reg(t, "framework_get_reactors", |t, _: NoParams| async move { get_reactors(&t).await })?;
    Ok(())
}

async fn get_reactors(t: &Arc<Target>) -> Result<Value, RpcError> {
    let stats = t.reactors.stats();
    let mut out = Vec::with_capacity(stats.len());
    for s in stats {
        let pollers = t
            .reactors
            .run_on(s.index, || async { reactor::poller_stats() })
            .await
            .map_err(|_| crate::target::canceled())?;
        let uring = t.reactors.run_on(s.index, || async { reactor::uring_stats() }).await.ok().flatten();
        let pollers: Vec<Value> =
            pollers.iter().map(|p| json!({"name": p.name, "run_count": p.runs, "busy_count": p.busy_count})).collect();
        out.push(json!({
            "lcore": s.lcore.unwrap_or(s.index),
            "index": s.index,
            "pinned": s.lcore.is_some(),
            "busy": s.busy_ns,
            "idle": s.idle_ns,
            "in_interrupt": false,
            "lw_threads": [],
            "iterations": s.iterations,
            "sleeps": s.sleeps,
            "messages": s.messages,
            "pollers": pollers,
            "uring": uring.map(|u| json!({
                "submitted": u.submitted,
                "completed": u.completed,
                "enter_calls": u.enter_calls,
                "backpressure_waits": u.backpressure_waits,
            })),
        }));
    }
    Ok(json!({ "tick_rate": TICK_RATE, "pid": std::process::id(), "reactors": out }))
}

/// SPDK's rpc.py sends `with_batches` to `framework_get_config`; tiercache never batches
/// config entries, so both values give the same (flat) list.
fn strip_with_batches(o: &mut Map<String, Value>) -> Result<(), RpcError> {
    match o.remove("with_batches") {
        None | Some(Value::Bool(_)) | Some(Value::Null) => Ok(()),
        Some(_) => Err(RpcError::invalid_params("with_batches: must be a boolean")),
    }
}

/// The config subsystems and their methods.
pub fn register_config(t: &Arc<Target>) -> Result<(), RpcError> {
    let me = t.clone();
    t.assembler.add_subsystem_fn("bdev", &[], move || {
        let me = me.clone();
        async move { Ok(bdev_config(&me)) }
    })?;
    let me = t.clone();
    t.assembler.add_subsystem_fn("nbd", &["bdev"], move || {
        let me = me.clone();
        async move { Ok(nbd_config(&me)) }
    })?;
    reg(t, "framework_get_subsystems", |t, _: NoParams| async move { Ok(t.assembler.subsystems_value()) })?;
    reg_pre(t, "framework_get_config", strip_with_batches, |t, p: FrameworkGetConfigParams| async move {
        let entries = t.assembler.subsystem_config(&p.name).await?;
        Ok(Value::Array(entries.iter().map(ConfigEntry::to_value).collect()))
    })?;
    reg(t, "save_config", |t, p: SaveConfigParams| async move {
        Ok(t.assembler.assemble(p.subsystems.as_deref()).await?.to_value())
    })?;
    Ok(())
}

/// Bdevs in an order where every bdev comes after the bdevs it is built on (creation
/// order, fixed up where needed).
fn dependency_order(bdevs: Vec<Arc<dyn Bdev>>) -> Vec<Arc<dyn Bdev>> {
    let names: BTreeSet<String> = bdevs.iter().map(|b| b.info().name.clone()).collect();
    let mut placed: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::with_capacity(bdevs.len());
    let mut pending = bdevs;
    while !pending.is_empty() {
        let before = pending.len();
        let mut rest = Vec::new();
        for b in pending {
            let ready = b.base_bdevs().iter().all(|d| placed.contains(d) || !names.contains(d));
            if ready {
                placed.insert(b.info().name.clone());
                out.push(b);
            } else {
                rest.push(b);
            }
        }
        if rest.len() == before {
            // A cycle cannot happen (a bdev is created after its bases); keep them anyway.
            out.extend(rest);
            break;
        }
        pending = rest;
    }
    out
}

fn bdev_config(t: &Arc<Target>) -> Vec<ConfigEntry> {
    let mut out = Vec::new();
    let mut sets_done = BTreeSet::new();
    for b in dependency_order(t.bdevs.list()) {
        if let Some(cb) = b.as_any().downcast_ref::<CachedBdev>() {
            let params = json!({
                "name": b.info().name,
                "mode": mode_name(cb.mode()),
                "cache_bdev_name": cb.cache_set().cache_desc().name(),
                "core_bdev_name": cb.backing().desc.name(),
            });
            out.push(ConfigEntry { method: "bdev_cache_create".into(), params: Some(params) });
            // The set's options follow its first cached bdev (they are per set).
            if sets_done.insert(cb.cache_set().uuid) {
                out.extend(super::cache::options_config(&b.info().name, &cb.cache_set().options()));
            }
            continue;
        }
        let Some((method, mut params)) = b.config_call() else {
            log::warn!("save_config: bdev {} ({}) cannot be saved", b.info().name, b.driver());
            continue;
        };
        if method == "bdev_delay_create" {
            // update_latency may leave an average above its p99; the delay model treats
            // that as p99 = avg, and the create method requires p99 >= avg.
            for (avg, p99) in [("avg_read_latency", "p99_read_latency"), ("avg_write_latency", "p99_write_latency")] {
                let a = params.get(avg).and_then(Value::as_u64).unwrap_or(0);
                if params.get(p99).and_then(Value::as_u64).unwrap_or(0) < a {
                    params[p99] = json!(a);
                }
            }
        }
        let params = schema_clean(&method, params);
        out.push(ConfigEntry { method, params: Some(params) });
    }
    out
}

fn nbd_config(t: &Arc<Target>) -> Vec<ConfigEntry> {
    let nbd = lock(&t.nbd);
    let mut out = Vec::new();
    for (requested, _) in &nbd.listeners {
        out.push(ConfigEntry { method: "nbd_server_start".into(), params: Some(json!({ "listen": requested })) });
    }
    for (name, e) in &nbd.exports {
        let mut p = json!({ "bdev_name": e.bdev_name, "export_name": name });
        if e.read_only {
            p["read_only"] = json!(true);
        }
        out.push(ConfigEntry { method: "nbd_export_add".into(), params: Some(p) });
    }
    out
}
