"""Names fixed by the data sources and the study: findings, groups, splits."""

# The 14 CheXpert findings, in MIMIC-CXR-JPG's column order.
FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

# The source study's six race groups.
RACE_GROUPS = (
    "Asian",
    "Black or African American",
    "Hispanic/Latino",
    "Other",
    "Unknown",
    "White",
)

# MIMIC-CXR-JPG's official split names.
SPLITS = ("train", "validate", "test")

FRONTAL_VIEWS = ("PA", "AP")
