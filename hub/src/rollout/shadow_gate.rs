//! The shadow stage's gate: top-1 agreement and mean absolute difference of the target beside
//! the fallback.

use super::*;

/// The shadow stage's two gate figures over the shadowing devices' comparisons. Neither has a
/// value before `min_comparisons` comparisons were reported, so a handful of early inputs can
/// neither breach the gate nor let the stage be left.
pub fn shadow_figures(shadow: &ShadowStage, shadowing: &[&DeviceFacts]) -> [GateFigure; 2] {
    let mut stats = ShadowCounts::default();
    for device in shadowing {
        stats.add(&device.shadow);
    }
    let judged = stats.judged();
    let enough = judged >= shadow.min_comparisons;
    let reporting = shadowing
        .iter()
        .filter(|device| device.shadow.judged() > 0)
        .count();
    let detail = if enough {
        format!(
            "{} agreed of {judged} comparisons on {reporting} devices, {} failed on the target; \
             mean |diff| over {} values; {} inputs not shadowed (queue full)",
            stats.top1_agreed, stats.errors, stats.abs_diff_values, stats.dropped
        )
    } else {
        format!(
            "{judged} of {} comparisons needed yet, on {reporting} devices",
            shadow.min_comparisons
        )
    };
    let agreement = enough.then(|| stats.top1_agreed as f64 / judged as f64);
    let mean_diff = (enough && stats.abs_diff_values > 0)
        .then(|| stats.abs_diff_sum / stats.abs_diff_values as f64);
    [
        GateFigure {
            gate: Gate::ShadowTop1Agreement,
            value: agreement,
            limit: shadow.min_top1_agreement,
            // A floor: breached below its limit.
            breached: agreement.is_some_and(|value| value < shadow.min_top1_agreement),
            detail: detail.clone(),
        },
        figure(
            Gate::ShadowMeanAbsDiff,
            mean_diff,
            shadow.max_mean_abs_diff,
            detail,
        ),
    ]
}
