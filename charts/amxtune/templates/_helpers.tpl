{{- define "amxtune.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "amxtune.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: amxtune
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "amxtune.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "amxtune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "amxtune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The rules the operator needs, and no more (shared by ClusterRole and Roles). */}}
{{- define "amxtune.rules" -}}
- apiGroups: [amxtune.io]
  resources: [finetunejobs, inferencejobs]
  verbs: [get, list, watch]
- apiGroups: [amxtune.io]
  resources: [inferencejobs]
  verbs: [create]
- apiGroups: [amxtune.io]
  resources: [finetunejobs/status, inferencejobs/status]
  verbs: [get, patch]
# blockOwnerDeletion on the objects a job owns needs update on the owner's finalizers
- apiGroups: [amxtune.io]
  resources: [finetunejobs/finalizers, inferencejobs/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
- apiGroups: [""]
  resources: [services, configmaps, persistentvolumeclaims]
  verbs: [get, create]
# existence checks of a job's token Secret (values are never logged or copied)
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}
