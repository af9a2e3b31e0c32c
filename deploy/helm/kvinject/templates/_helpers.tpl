{{- define "kvinject.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kvinject.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvinject.labels" -}}
{{ include "kvinject.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kvinject
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kvinject.serviceAccountName" -}}
{{- default (include "kvinject.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "kvinject.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Namespaces never acted for: the registration's exclusions, comma-separated. */}}
{{- define "kvinject.excludedNamespaces" -}}
{{- join "," (concat (list "kube-system" .Release.Namespace) .Values.webhook.excludeNamespaces) -}}
{{- end -}}

{{/* The Secret holding the keys that seal materialized Secrets. */}}
{{- define "kvinject.signingKeySecret" -}}
{{- printf "%s-signing-key" (include "kvinject.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The names the apiserver uses for the Service. */}}
{{- define "kvinject.dnsNames" -}}
{{- $svc := include "kvinject.fullname" . -}}
- {{ $svc }}
- {{ $svc }}.{{ .Release.Namespace }}
- {{ $svc }}.{{ .Release.Namespace }}.svc
- {{ $svc }}.{{ .Release.Namespace }}.svc.cluster.local
{{- range .Values.tls.extraSans }}
- {{ . }}
{{- end }}
{{- end -}}

{{/* Fails the render on settings that cannot work, naming the value. */}}
{{- define "kvinject.validate" -}}
{{- if not .Values.vaults -}}
{{- fail "vaults: name at least one vault (NAME or NAME=https://URL)" -}}
{{- end -}}
{{- if not (has .Values.tls.source (list "bootstrap" "certManager" "secret")) -}}
{{- fail (printf "tls.source: %q is not one of bootstrap, certManager, secret" .Values.tls.source) -}}
{{- end -}}
{{- if and (eq .Values.tls.source "secret") (not .Values.tls.caBundle) -}}
{{- fail "tls.caBundle: tls.source=secret needs the CA (base64), e.g. the line `kvinject certs` prints" -}}
{{- end -}}
{{- if not (has .Values.identity.default (list "kvinject" "workload")) -}}
{{- fail (printf "identity.default: %q is not kvinject or workload" .Values.identity.default) -}}
{{- end -}}
{{- if and (eq .Values.identity.default "workload") (not .Values.identity.perServiceAccount) -}}
{{- fail "identity.default: workload needs identity.perServiceAccount=true (kvinject must mint ServiceAccount tokens)" -}}
{{- end -}}
{{- if not (has .Values.accessPolicy (list "required" "off")) -}}
{{- fail (printf "accessPolicy: %q is not required or off" .Values.accessPolicy) -}}
{{- end -}}
{{- if not (has .Values.webhook.failurePolicy (list "Fail" "Ignore")) -}}
{{- fail (printf "webhook.failurePolicy: %q is not Fail or Ignore" .Values.webhook.failurePolicy) -}}
{{- end -}}
{{- $t := int .Values.webhook.timeoutSeconds -}}
{{- if or (lt $t 3) (gt $t 9) -}}
{{- fail (printf "webhook.timeoutSeconds: %d must be 3..9 (below the apiserver's 10 s; kvinject answers within it minus 2 s)" $t) -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.from) -}}
{{- fail "networkPolicy.from: say where the apiserver's calls to the webhook come from, e.g. your nodes' addresses ([{ipBlock: {cidr: 10.240.0.0/16}}]) or, on a managed control plane, its tunnel pods ([{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {app: konnectivity-agent}}}]); or set networkPolicy.enabled=false (then consider --client-ca)" -}}
{{- end -}}
{{- if not (has .Values.antiAffinity (list "preferred" "required" "none")) -}}
{{- fail (printf "antiAffinity: %q is not preferred, required or none" .Values.antiAffinity) -}}
{{- end -}}
{{- end -}}
