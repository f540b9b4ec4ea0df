"""archc.passes"""
