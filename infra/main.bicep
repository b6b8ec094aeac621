// Durable Functions for Python on Azure Storage: the function app, its storage account (which also
// holds the task hub), a managed identity for it, and monitoring, in one deployment:
//   az deployment group create -g RG -f infra/main.bicep -p infra/main.parameters.json
// Storage is reached only with the managed identity (the account refuses shared keys). See
// infra/README.md for the parameters and for publishing the code.

@description('Region of every resource.')
param location string = resourceGroup().location

@description('Name of the function app (globally unique: <appName>.azurewebsites.net; letters, digits and hyphens). Also the prefix of the other resource names.')
@minLength(2)
@maxLength(50)
param appName string = 'durable-${uniqueString(resourceGroup().id)}'

@description('Hosting plan: FlexConsumption (FC1, the default), Consumption (Y1, Linux; being retired, no Python 3.13) or Premium (EP1, Elastic Premium).')
@allowed([
  'FlexConsumption'
  'Consumption'
  'Premium'
])
param hostingPlan string = 'FlexConsumption'

@description('Python version of the Functions worker.')
@allowed([
  '3.10'
  '3.11'
  '3.12'
  '3.13'
])
param pythonVersion string = '3.12'

@description('Task hub name (3-45 letters or digits, starting with a letter): the hub\'s tables, queues and containers are named after it. Several apps can share the storage account with different hub names.')
@minLength(3)
@maxLength(45)
param taskHubName string = 'DurableHub'

@description('Flex Consumption only: the most instances the app scales out to.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Flex Consumption only: memory of each instance, in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('The management API\'s key (the DURABLE_MANAGEMENT_KEY app setting): the API checks code=<key> against it and the check-status URLs carry it; on Azure the API stays closed without one. Defaults to a new random value on every deployment: pass one to keep outstanding check-status URLs valid across deployments.')
@secure()
@minLength(32)
param managementKey string = replace('${newGuid()}${newGuid()}', '-', '')

@description('Optional: object id of a user or group that gets the same data roles on the storage account as the app (to upload a package for the Consumption and Premium plans, or to run `durable` commands against the task hub from a workstation).')
param operatorPrincipalId string = ''

var isFlex = hostingPlan == 'FlexConsumption'
var isPremium = hostingPlan == 'Premium'
var planSkus = {
  FlexConsumption: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  Consumption: {
    name: 'Y1'
    tier: 'Dynamic'
  }
  Premium: {
    name: 'EP1'
    tier: 'ElasticPremium'
  }
}
var planKinds = {
  FlexConsumption: 'functionapp'
  Consumption: 'functionapp'
  Premium: 'elastic'
}
// 3-24 lowercase letters and digits.
var storageAccountName = 'st${uniqueString(resourceGroup().id, appName)}'
// Holds the app's package: Flex Consumption deploys into it; the other plans run from the blob
// named in WEBSITE_RUN_FROM_PACKAGE (no Azure Files content share, which would need a shared key).
var deploymentContainerName = 'app-package'
var packageBlobUrl = '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}/app.zip'

// The data roles the Functions host and the runtime need on the account: blobs (host leases, large
// payloads, the package), queues (triggers, control and work-item queues), tables (histories,
// instances).
var storageRoleIds = [
  'b7e6dc6d-f1e8-4753-8033-0f276bb0955b' // Storage Blob Data Owner
  '974c5e8b-45b9-4653-ba55-5f855dd0d86a' // Storage Queue Data Contributor
  '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3' // Storage Table Data Contributor
]

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${appName}-identity'
  location: location
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageAccountName
  location: location
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    // Entra ID only: the app connects with its managed identity.
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource appRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for roleId in storageRoleIds: {
  name: guid(storage.id, identity.id, roleId)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}]

resource operatorRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for roleId in (empty(operatorPrincipalId) ? [] : storageRoleIds): {
  name: guid(storage.id, operatorPrincipalId, roleId)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
    principalId: operatorPrincipalId
  }
}]

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${appName}-logs'
  location: location
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 30
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: '${appName}-insights'
  location: location
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
  }
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: '${appName}-plan'
  location: location
  kind: planKinds[hostingPlan]
  sku: planSkus[hostingPlan]
  // reserved: true makes it a Linux plan.
  properties: union({ reserved: true }, isPremium ? { maximumElasticWorkerCount: 20 } : {})
}

// Settings every plan gets. AzureWebJobsStorage is identity-based: the Functions host (queue
// triggers, leases) and the runtime (the task hub) both resolve it from these three settings.
var commonAppSettings = [
  {
    name: 'AzureWebJobsStorage__accountName'
    value: storage.name
  }
  {
    name: 'AzureWebJobsStorage__credential'
    value: 'managedidentity'
  }
  {
    name: 'AzureWebJobsStorage__clientId'
    value: identity.properties.clientId
  }
  {
    name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
    value: appInsights.properties.ConnectionString
  }
  // Overrides host.json's extensions.durableTask.hubName, as the Functions host does for any
  // host.json value given as an AzureFunctionsJobHost__<path> app setting.
  {
    name: 'AzureFunctionsJobHost__extensions__durableTask__hubName'
    value: taskHubName
  }
  {
    name: 'DURABLE_MANAGEMENT_KEY'
    value: managementKey
  }
]

// Flex Consumption sets the worker runtime and the package location in functionAppConfig and
// rejects these settings; the other plans need them. They run from the package blob, fetched with
// the managed identity.
var classicAppSettings = [
  {
    name: 'FUNCTIONS_EXTENSION_VERSION'
    value: '~4'
  }
  {
    name: 'FUNCTIONS_WORKER_RUNTIME'
    value: 'python'
  }
  {
    name: 'WEBSITE_RUN_FROM_PACKAGE'
    value: packageBlobUrl
  }
  {
    name: 'WEBSITE_RUN_FROM_PACKAGE_BLOB_MI_RESOURCE_ID'
    value: identity.id
  }
]

var flexAppConfig = {
  deployment: {
    storage: {
      type: 'blobContainer'
      value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
      authentication: {
        type: 'UserAssignedIdentity'
        userAssignedIdentityResourceId: identity.id
      }
    }
  }
  scaleAndConcurrency: {
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
  }
  runtime: {
    name: 'python'
    version: pythonVersion
  }
}

var baseSiteConfig = {
  ftpsState: 'Disabled'
  minTlsVersion: '1.2'
  scmMinTlsVersion: '1.2'
  http20Enabled: true
  appSettings: isFlex ? commonAppSettings : concat(commonAppSettings, classicAppSettings)
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: appName
  location: location
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: union({
    serverFarmId: plan.id
    reserved: true
    httpsOnly: true
    clientAffinityEnabled: false
    keyVaultReferenceIdentity: identity.id
    siteConfig: isFlex ? baseSiteConfig : union(baseSiteConfig, { linuxFxVersion: 'Python|${pythonVersion}' })
  }, isFlex ? { functionAppConfig: flexAppConfig } : {})
  // The host starts with the app: give it its storage roles first.
  dependsOn: [
    appRoles
    deploymentContainer
  ]
}

output functionAppName string = functionApp.name
output defaultHostName string = functionApp.properties.defaultHostName
output storageAccountName string = storage.name
output packageBlobUrl string = packageBlobUrl
output identityClientId string = identity.properties.clientId
