"""archc.backends"""
