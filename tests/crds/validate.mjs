// Validates custom resources against their operators' CRD schemas (kubernetes-models).
// Reads a JSON array of manifests on stdin; prints a JSON array of errors ("" when valid).
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";

const MODELS = [PrometheusRule, ServiceMonitor, PodMonitor, ScaledObject];

let input = "";
for await (const chunk of process.stdin) input += chunk;
const errors = JSON.parse(input).map((manifest) => {
  const model = MODELS.find(
    (m) => m.apiVersion === manifest.apiVersion && m.kind === manifest.kind,
  );
  if (!model) return `no schema for ${manifest.apiVersion} ${manifest.kind}`;
  try {
    new model(manifest).validate();
    return "";
  } catch (error) {
    return `${manifest.kind} ${manifest.metadata?.name}: ${error.message}`;
  }
});
console.log(JSON.stringify(errors));
