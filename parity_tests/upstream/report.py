"""The printed report of one release: where its functions were found, the rules it follows,
per function the cases, agreements, expected differences and disagreements, and the first
disagreements as pasteable ``SplitCase(...)`` literals.
"""

from __future__ import annotations

from tbo_parity.parity_tests.upstream.classify import Report
from tbo_parity.parity_tests.upstream.lift import ROLES

def format_report(report: Report) -> str:
    release = report.release
    source = release.source
    counts = ", ".join(f"{rule} {n}" for rule, n in report.rule_counts.items())
    rule_line = (f"EXTEND rule: {report.rule}" if report.rule else
                 "EXTEND rule: matches NO rule (a finding); compared under two_chunk") + \
        f"  (EXTEND disagreements per rule: {counts})"
    lines = [f"== {source.label}", f"module:      {source.module_path}",
             f"ForwardMode: {release.forward_mode_origin}", rule_line]
    if report.dp_rule_counts:
        dp_counts = ", ".join(f"{rule} {n}" for rule, n in report.dp_rule_counts.items())
        lines.append((f"DP rule:     {report.dp_rule}" if report.dp_rule else
                      "DP rule:     matches NO rule; compared under the default") +
                     f"  (data-parallel disagreements per rule: {dp_counts})")
    lines.append("")
    header = f"{'function':<20} {'upstream name':<58} {'cases':>6} {'agree':>6} " \
             f"{'expected':>8} {'differ':>6}"
    lines += [header, "-" * len(header)]
    for role in ROLES:
        loaded = release.roles.get(role.name)
        if loaded is None:
            lines.append(f"{role.name:<20} {'(absent)':<58}")
            continue
        name = loaded.qualname.replace("TboForwardBatchPreparer.", "TboFBP.").replace(
            "TboDPAttentionPreparer.", "TboDPAP.") + (" (renamed)" if loaded.renamed else "")
        if loaded.problem:
            lines.append(f"{role.name:<20} {name:<58} not run: {loaded.problem}")
            continue
        result = report.results[role.name]
        lines.append(f"{role.name:<20} {name:<58} {result.cases:>6} {result.agree:>6} "
                     f"{sum(result.expected.values()):>8} {result.differ:>6}")
    lines.append("(TboFBP: TboForwardBatchPreparer, TboDPAP: TboDPAttentionPreparer)")
    signatures = [f"  {role}: {loaded.signature}" for role, loaded in release.roles.items()]
    lines += ["", "signatures:"] + signatures
    expected = [f"  {role}: {count} x {reason}" for role, result in report.results.items()
                for reason, count in result.expected.items()]
    if expected:
        lines += ["", "expected differences (not failures):"] + expected
    if release.unknown:
        lines += ["", f"unknown functions (not compared): {', '.join(release.unknown)}"]
    firsts = [f"  {role}: {literal}\n      spec={ours!r} upstream={theirs!r}"
              for role, result in report.results.items()
              for literal, ours, theirs in result.examples]
    if firsts:
        lines += ["", "first disagreements:"] + firsts
    verdict = "AGREES" if report.ok else f"{report.unexplained} unexplained disagreement(s)" \
        if report.rule else "matches no EXTEND rule"
    lines += ["", f"verdict: {verdict} ({report.seconds:.1f} s)", ""]
    return "\n".join(lines)
