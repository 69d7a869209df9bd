//! The stage DAG: topological order, and cycles reported with their stages.

use std::collections::HashMap;

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use super::StageInstance;
use super::diagnostic::PipelineError;
use super::source::{Parser, RawStage};

/// Orders `instances` so that each comes after everything it needs (ties keep file order);
/// a cycle is an error naming its stages and pointing at the `needs` of one of them.
pub(super) fn order_stages(
    parser: &Parser<'_>,
    raw: &[RawStage<'_>],
    instances: Vec<(StageInstance, usize)>,
) -> Result<Vec<StageInstance>, Box<PipelineError>> {
    let mut graph: DiGraph<usize, ()> = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..instances.len()).map(|i| graph.add_node(i)).collect();
    let by_name: HashMap<&str, usize> = instances
        .iter()
        .enumerate()
        .map(|(i, (inst, _))| (inst.name.as_str(), i))
        .collect();
    for (i, (inst, _)) in instances.iter().enumerate() {
        for need in &inst.needs {
            if let Some(&j) = by_name.get(need.as_str()) {
                graph.add_edge(nodes[j], nodes[i], ());
            }
        }
    }

    for scc in tarjan_scc(&graph) {
        let self_loop = scc.len() == 1 && graph.contains_edge(scc[0], scc[0]);
        if scc.len() > 1 || self_loop {
            let mut members: Vec<usize> = scc.iter().map(|n| graph[*n]).collect();
            members.sort_unstable();
            let mut names: Vec<String> = Vec::new();
            for m in &members {
                let base = &instances[*m].0.base;
                if !names.contains(base) {
                    names.push(base.clone());
                }
            }
            let first = &raw[instances[members[0]].1];
            let span = first.needs_span.clone().unwrap_or(first.name.span());
            let mut chain = names.clone();
            chain.push(names[0].clone());
            return Err(parser.error(
                span,
                format!("stages form a cycle: {}", chain.join(" → ")),
                Some("remove one of these `needs` entries so the stages form a DAG".into()),
            ));
        }
    }

    // Kahn's algorithm, always taking the ready stage that comes first in the file.
    let mut indegree: Vec<usize> = nodes
        .iter()
        .map(|n| {
            graph
                .neighbors_directed(*n, petgraph::Direction::Incoming)
                .count()
        })
        .collect();
    let mut done = vec![false; instances.len()];
    let mut order = Vec::with_capacity(instances.len());
    while order.len() < instances.len() {
        let Some(next) = (0..instances.len()).find(|&i| !done[i] && indegree[i] == 0) else {
            break;
        };
        done[next] = true;
        order.push(next);
        for succ in graph.neighbors_directed(nodes[next], petgraph::Direction::Outgoing) {
            indegree[graph[succ]] -= 1;
        }
    }
    let mut slots: Vec<Option<StageInstance>> =
        instances.into_iter().map(|(i, _)| Some(i)).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}
