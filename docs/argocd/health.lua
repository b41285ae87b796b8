-- Argo CD health check for amxtune.io FineTuneJob and InferenceJob (the same logic for both).
-- Install it as resource.customizations.health.amxtune.io_FineTuneJob and
-- resource.customizations.health.amxtune.io_InferenceJob in argocd-cm (docs/gitops.md).
local hs = {status = "Progressing", message = "Waiting for the amxtune operator"}
if obj.status == nil then
  return hs
end
local status = obj.status
if status.observedGeneration ~= nil and obj.metadata ~= nil and obj.metadata.generation ~= nil
    and status.observedGeneration < obj.metadata.generation then
  hs.message = "Waiting for the operator to see the latest spec"
  return hs
end
local stalled = nil
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Stalled" and condition.status == "True" then
      stalled = condition
    end
  end
end
local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Failed" or stalled ~= nil then
  hs.status = "Degraded"
elseif phase == "Suspended" then
  hs.status = "Suspended"
end
if stalled ~= nil and stalled.message ~= nil and stalled.message ~= "" then
  hs.message = stalled.reason .. ": " .. stalled.message
elseif status.message ~= nil and status.message ~= "" then
  hs.message = status.message
elseif phase ~= nil then
  hs.message = phase
end
if hs.status == "Progressing" and status.progress ~= nil and status.progress.display ~= nil
    and status.progress.display ~= "" then
  hs.message = hs.message .. " (step " .. status.progress.display .. ")"
end
return hs
