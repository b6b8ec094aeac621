// Durable Functions for Python on Azure Storage: the function app, its storage account (which also
// holds the task hub) and monitoring. Deploy with `az deployment group create` (see infra/README.md).

@description('Region of every resource.')
param location string = resourceGroup().location

@description('Name of the function app (globally unique: <appName>.azurewebsites.net; letters, digits and hyphens). Also the prefix of the other resource names.')
@minLength(2)
@maxLength(50)
param appName string = 'durable-${uniqueString(resourceGroup().id)}'

@description('Python version of the Functions worker (the runtime needs 3.10 or later).')
@allowed([
  '3.10'
  '3.11'
  '3.12'
])
param pythonVersion string = '3.11'

@description('Task hub name (3-45 letters or digits, starting with a letter). Written to the DURABLE_TASK_HUB app setting; it takes effect when host.json says "hubName": "%DURABLE_TASK_HUB%".')
@minLength(3)
@maxLength(45)
param taskHubName string = 'DurableHub'

@description('Hosting plan: Y1 = Linux Consumption, EP1 = Elastic Premium.')
@allowed([
  'Y1'
  'EP1'
])
param planSku string = 'Y1'

@description('Optional. A function key of the app; when set, it becomes the DURABLE_MANAGEMENT_KEY app setting, so check-status URLs carry code=<key>. Register the same value as a host key after deployment (see infra/README.md).')
@secure()
param managementKey string = ''

var isPremium = planSku == 'EP1'
// 3-24 lowercase letters and digits.
var storageAccountName = 'st${uniqueString(resourceGroup().id, appName)}'
// Azure Files share for the app's code (lowercase letters and digits, at most 57 characters).
var contentShareName = '${take(toLower(replace(appName, '-', '')), 50)}content'
var consumptionSku = {
  name: 'Y1'
  tier: 'Dynamic'
  size: 'Y1'
  family: 'Y'
}
var premiumSku = {
  name: 'EP1'
  tier: 'ElasticPremium'
  size: 'EP1'
  family: 'EP'
}

resource storage 'Microsoft.Storage/storageAccounts@2023-01-01' = {
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
    // Shared keys stay enabled: the runtime and the content share connect with a connection string.
    allowSharedKeyAccess: true
  }
}

resource workspace 'Microsoft.OperationalInsights/workspaces@2022-10-01' = {
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

resource plan 'Microsoft.Web/serverfarms@2023-01-01' = {
  name: '${appName}-plan'
  location: location
  kind: isPremium ? 'elastic' : 'functionapp'
  sku: isPremium ? premiumSku : consumptionSku
  // reserved: true makes it a Linux plan.
  properties: union({ reserved: true }, isPremium ? { maximumElasticWorkerCount: 20 } : {})
}

// AzureWebJobsStorage: the Functions host (queue triggers, leases) and this runtime (task hub
// tables, queues, blobs) both use it. The runtime reads it as a connection string, so the
// identity-based form (AzureWebJobsStorage__accountName plus a managed identity holding the
// Storage Blob Data Owner, Storage Queue Data Contributor and Storage Table Data Contributor roles)
// would only serve the host, not the runtime. Key Vault references
// (@Microsoft.KeyVault(SecretUri=...)) are a way to keep the key out of the site config.
var storageConnectionString = 'DefaultEndpointsProtocol=https;AccountName=${storage.name};EndpointSuffix=${environment().suffixes.storage};AccountKey=${storage.listKeys().keys[0].value}'

var baseAppSettings = [
  {
    name: 'AzureWebJobsStorage'
    value: storageConnectionString
  }
  {
    name: 'FUNCTIONS_EXTENSION_VERSION'
    value: '~4'
  }
  {
    name: 'FUNCTIONS_WORKER_RUNTIME'
    value: 'python'
  }
  {
    name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
    value: appInsights.properties.ConnectionString
  }
  // Consumption and Elastic Premium plans keep the app's content on an Azure Files share.
  {
    name: 'WEBSITE_CONTENTAZUREFILECONNECTIONSTRING'
    value: storageConnectionString
  }
  {
    name: 'WEBSITE_CONTENTSHARE'
    value: contentShareName
  }
  // Remote build: the deployment runs `pip install -r requirements.txt` on the server.
  {
    name: 'SCM_DO_BUILD_DURING_DEPLOYMENT'
    value: 'true'
  }
  {
    name: 'DURABLE_TASK_HUB'
    value: taskHubName
  }
]

var managementKeySettings = empty(managementKey) ? [] : [
  {
    name: 'DURABLE_MANAGEMENT_KEY'
    value: managementKey
  }
]

resource functionApp 'Microsoft.Web/sites@2023-01-01' = {
  name: appName
  location: location
  kind: 'functionapp,linux'
  properties: {
    serverFarmId: plan.id
    reserved: true
    httpsOnly: true
    clientAffinityEnabled: false
    siteConfig: {
      linuxFxVersion: 'Python|${pythonVersion}'
      ftpsState: 'Disabled'
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      http20Enabled: true
      appSettings: concat(baseAppSettings, managementKeySettings)
    }
  }
}

output functionAppName string = functionApp.name
output defaultHostName string = functionApp.properties.defaultHostName
output storageAccountName string = storage.name
